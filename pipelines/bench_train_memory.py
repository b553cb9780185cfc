"""Peak RSS of `pcam-prep train` on CPU, by batch size: what a laptop can run.

Each configuration trains in its own process; its peak resident set comes from os.wait4's
rusage for that process alone (ru_maxrss), so runs do not see each other's memory.

    python pipelines/bench_train_memory.py --shards shards/ --batch-sizes 64,256 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss(args: list[str]) -> tuple[float, float, int]:
    """(peak RSS in GB, wall seconds, exit status) of one `pcam-prep` run."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pcam_prep", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read().decode())
    return usage.ru_maxrss / 1e6, time.perf_counter() - start, proc.returncode  # ru_maxrss is in KB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--arch", default="small")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    manifest = json.loads((args.shards / "manifest.json").read_text())
    images = manifest["splits"]["train"]["count"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            gb, wall, code = peak_rss(["train", "--shards", str(args.shards), "--out", f"{tmp}/run-{batch}",
                                       "--epochs", str(args.epochs), "--batch-size", str(batch), "--arch", args.arch,
                                       "--device", "cpu"])
            rows.append({"arch": args.arch, "train_images": images, "epochs": args.epochs, "batch_size": batch,
                         "peak_rss_gb": round(gb, 2), "seconds": round(wall, 1), "ok": code == 0})
    print("| arch | train images | epochs | batch | peak RSS | wall |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['train_images']:,} | {r['epochs']} | {r['batch_size']} | {r['peak_rss_gb']:.2f} GB "
              f"| {r['seconds']:.0f} s{'' if r['ok'] else ' (failed)'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
