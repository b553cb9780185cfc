"""Full-scale build benchmark: the whole Kaggle-sized set (220,025 train + 57,458 test).

    python pipelines/bench_fullscale.py --work /data/bench        # ~30-40 min on 2 cores

Synthesizes the full set once (kept in --work for reruns), then times, each as its own
process with its peak RSS summed over all worker processes:
- `build` per format alone and all three together;
- the stock approach (tifffile per file + webdataset ShardWriter);
- the I/O floor: `cat` of every source file, plus `dd` (O_DIRECT, as the build writes) of as many bytes as the
  three-format build wrote.
Every timed contender, the floor's `cat` included, starts with the page cache in the same
state (`--cache`): `warm` reads every source once, untimed, just before it (the sources fit
in memory; the outputs written by the run before may have evicted them); `cold` drops the
page cache first (`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root).
Goal (issue #6): the three-format build within 2x the I/O floor, and peak RSS at 277k images
within +-25 % of the peak at 20k (`--small` builds that for comparison).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_build import STOCK, timed

TRAIN, TEST = 220_025, 57_458


def synth(root: Path, train: int, test: int) -> Path:
    if not (root / "sample_submission.csv").exists():
        subprocess.run([sys.executable, "-m", "pcam_prep", "synth", str(root), "--train", str(train),
                        "--test", str(test), "--seed", "2026"], check=True)
    return root


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cache_state(src: Path, cache: str) -> None:
    """Put the page cache in the same state before every timed contender."""
    if cache == "cold":
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        subprocess.run(["sh", "-c", f"find {src} -name '*.tif' -print0 | xargs -0 cat > /dev/null"], check=True)


def build(src: Path, out: Path, formats: str, cache: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cache_state(src, cache)
    wall, rss = timed([sys.executable, "-m", "pcam_prep", "build", "--src", str(src), "--out", str(out),
                       "--formats", formats])
    stages = json.loads((out / "run.json").read_text())["stages"]
    return {"seconds": wall, "rss_mib": rss, "bytes": folder_bytes(out), "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--train", type=int, default=TRAIN)
    parser.add_argument("--test", type=int, default=TEST)
    parser.add_argument("--small", type=int, default=16_000, help="train size of the small set for the RSS check")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm",
                        help="page-cache state every timed contender starts from (default: warm)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = synth(args.work / "full", args.train, args.test)
    n = args.train + args.test
    rows: dict[str, dict] = {}

    cache_state(src, args.cache)
    cat_s, _ = timed(["sh", "-c", f"find {src} -name '*.tif' -print0 | xargs -0 cat > /dev/null"])
    for formats in ("wds", "zarr", "hdf5", "wds,zarr,hdf5"):
        rows[f"build --formats {formats}"] = build(src, args.work / "out", formats, args.cache)
    written = rows["build --formats wds,zarr,hdf5"]["bytes"]
    dd_s, _ = timed(["dd", "if=/dev/zero", f"of={args.work / 'dd.bin'}", "bs=8M", "oflag=direct",  # as the build writes
                     f"count={written // 2**23 + 1}"],
                    stderr=subprocess.DEVNULL)
    (args.work / "dd.bin").unlink()
    shutil.rmtree(args.work / "out", ignore_errors=True)
    if not args.skip_stock:
        stock = args.work / "stock"
        shutil.rmtree(stock, ignore_errors=True)
        stock.mkdir()
        cache_state(src, args.cache)
        wall, rss = timed([sys.executable, "-c", STOCK, str(src), str(stock), "5000"])
        rows["stock: tifffile + ShardWriter (wds only)"] = {"seconds": wall, "rss_mib": rss}
        shutil.rmtree(stock)
    small = synth(args.work / "small", args.small, args.small * TEST // TRAIN)
    small_run = build(small, args.work / "out-small", "wds,zarr,hdf5", args.cache)
    shutil.rmtree(args.work / "out-small", ignore_errors=True)

    floor = cat_s + dd_s
    print(f"\n{n:,} images; {time.strftime('%Y-%m-%d')}; {platform.node()}, {platform.processor() or 'x86_64'}, "
          f"2 cores, 24 GB; page cache {args.cache} before every run\n")
    print("| run | seconds | images/s | x I/O floor | peak RSS MiB |\n|---|---:|---:|---:|---:|")
    print(f"| I/O floor: cat sources ({cat_s:.1f}s) + dd {written / 2**30:.1f} GiB ({dd_s:.1f}s) | {floor:.1f} | "
          f"{n / floor:,.0f} | 1.0 | - |")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.1f} | {n / row['seconds']:,.0f} | {row['seconds'] / floor:.2f} | "
              f"{row['rss_mib']:.0f} |")
    big_rss = rows["build --formats wds,zarr,hdf5"]["rss_mib"]
    print(f"\npeak RSS, three formats: {small_run['rss_mib']:.0f} MiB at {args.small + args.small * TEST // TRAIN:,} "
          f"images vs {big_rss:.0f} MiB at {n:,} ({(big_rss / small_run['rss_mib'] - 1) * 100:+.0f} %)")
    if args.json:
        args.json.write_text(json.dumps({"images": n, "cache": args.cache, "floor": {"cat": cat_s, "dd": dd_s},
                                         "runs": rows,
                                         "small": small_run}, indent=2))


if __name__ == "__main__":
    main()
