"""Benchmark `pcam-prep build` against the stock approach, in one run, on the same files.

Targets (issue #2): a wds-only build >= 10x the stock approach's images/s, all three formats
>= 5x; peak memory must not grow with the number of images (`--memory-sizes` builds a small
and a large set and compares the peaks).

Stock approach: one process, `tifffile.imread` per file, `webdataset.ShardWriter` writing
`.npy` + `.cls` (the same shard size). Floors: `cat` of every source file, and `dd` (O_DIRECT)
of the bytes each build writes. Each contender runs as its own process (imports included),
`--repeats` times in an interleaved order, each run after an untimed `cat` of the sources;
medians are reported with peak RSS (the process tree, sampled) and ratios against stock.

    python pipelines/bench_build.py --train 16000 --test 4000 --repeats 3

Prints a Markdown table and writes the raw figures as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STOCK = r"""
import os, sys, csv, tifffile, webdataset as wds
src, out, shard = sys.argv[1], sys.argv[2], int(sys.argv[3])
labels = {r["id"]: int(r["label"]) for r in csv.DictReader(open(os.path.join(src, "train_labels.csv")))}
with wds.ShardWriter(os.path.join(out, "train-%06d.tar"), maxcount=shard, verbose=0) as sink:
    for name in sorted(os.listdir(os.path.join(src, "train"))):
        key = name[:-4]
        sink.write({"__key__": key, "npy": tifffile.imread(os.path.join(src, "train", name)), "cls": labels[key]})
with wds.ShardWriter(os.path.join(out, "test-%06d.tar"), maxcount=shard, verbose=0) as sink:
    for name in sorted(os.listdir(os.path.join(src, "test"))):
        sink.write({"__key__": name[:-4], "npy": tifffile.imread(os.path.join(src, "test", name))})
"""


def timed(cmd: list[str], **kw) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a command *and all its worker processes*, summed.

    The tree is sampled every 20 ms with psutil, so the peak of a multi-process build counts
    every worker, not just the parent.
    """
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, **kw)
    parent = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, peak / 2**20


def contenders(src: Path, work: Path, shard: int, workers: int | None,
               local_cluster: bool = False, baseline: Path | None = None) -> dict[str, callable]:
    def fresh(name: str) -> Path:
        path = work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def then_free(run, name: str, keep: tuple[str, ...] = ("run.json",)):
        """Run, then delete the output (but `keep`): every contender starts with the same page cache state,
        its pages just freed, instead of the next one finding the cache full of a previous output."""
        def wrapped():
            result = run()
            for path in (work / name).iterdir() if (work / name).is_dir() else ():
                if path.name not in keep:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            return result
        return wrapped

    def build(formats: str, scheduler: str | None = None, code: Path | None = None):
        extra = ["--workers", str(workers)] if workers else []
        extra += ["--scheduler", scheduler] if scheduler else []
        name = f"ours-{formats}" + ("-cluster" if scheduler else "") + ("-baseline" if code else "")
        where = {"env": {**os.environ, "PYTHONPATH": str(code)}, "cwd": code} if code else {}  # `-m` puts cwd first
        return then_free(lambda: timed([sys.executable, "-m", "pcam_prep", "build", "--src", str(src), "--out",
                                        str(fresh(name)), "--formats", formats, "--shard-size", str(shard), *extra],
                                       **where), name)

    n_files = sum(1 for _ in src.rglob("*.tif"))
    shard_bytes = n_files * 29_696  # what the wds shards hold: one fixed-size record per image
    all_bytes = shard_bytes + 2 * n_files * 27_648  # + the Zarr and HDF5 pixels

    def dd(nbytes: int):
        # O_DIRECT, as the build writes its outputs: buffered dd into fresh page-cache pages runs at
        # ~400 MB/s on these VMs, against ~1.5-2 GB/s direct, so the direct figure is the floor
        return then_free(lambda: timed(["sh", "-c", f"dd if=/dev/zero of={fresh('dd')}/x bs=8M oflag=direct "
                                        f"count={nbytes // 2**23 + 1} 2>/dev/null"]), "dd", ())

    return {
        "cat (floor)": lambda: timed(["sh", "-c", f"find {src} -name '*.tif' -print0 | xargs -0 cat > /dev/null"]),
        "dd the wds bytes (floor)": dd(shard_bytes),
        "dd the three formats' bytes (floor)": dd(all_bytes),
        "stock: tifffile + ShardWriter": then_free(lambda: timed([sys.executable, "-c", STOCK, str(src),
                                                                  str(fresh("stock")), str(shard)]), "stock", ()),
        "pcam-prep build --formats wds": build("wds"),
        "pcam-prep build --formats wds,zarr,hdf5": build("wds,zarr,hdf5"),
    } | ({  # the default's rival: a dask.distributed LocalCluster started by the build itself
        "pcam-prep build --formats wds --scheduler local": build("wds", "local"),
        "pcam-prep build --formats wds,zarr,hdf5 --scheduler local": build("wds,zarr,hdf5", "local"),
    } if local_cluster else {}) | ({  # the same builds from another checkout (e.g. the commit before a change)
        f"baseline {baseline.name}: build --formats wds": build("wds", code=baseline),
        f"baseline {baseline.name}: build --formats wds,zarr,hdf5": build("wds,zarr,hdf5", code=baseline),
    } if baseline else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, help="existing Kaggle-layout folder (default: synthesize one)")
    parser.add_argument("--train", type=int, default=16000)
    parser.add_argument("--test", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write raw figures here")
    parser.add_argument("--local-cluster", action="store_true",
                        help="also time builds with --scheduler local (a dask.distributed LocalCluster)")
    parser.add_argument("--memory-sizes", default="", help="e.g. 5000,20000: peak RSS of a full build at each size")
    parser.add_argument("--baseline", type=Path, help="a checkout of another pcam-prep commit: its builds are timed "
                        "too, in the same interleaved runs (its package is put first on PYTHONPATH)")
    args = parser.parse_args()

    work = (args.work or Path(tempfile.mkdtemp(prefix="pcam-bench-"))).resolve()
    src = args.src.resolve() if args.src else None
    args.baseline = args.baseline.resolve() if args.baseline else None
    if src is None:
        src = work / "src"
        if not (src / "train_labels.csv").exists():
            subprocess.run([sys.executable, "-m", "pcam_prep", "synth", str(src), "--train", str(args.train),
                            "--test", str(args.test), "--seed", "7"], check=True)
    n_images = sum(1 for _ in (src / "train").iterdir()) + sum(1 for _ in (src / "test").iterdir())
    runs = contenders(src, work, args.shard_size, args.workers, args.local_cluster, args.baseline)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            # The same page cache for everyone: these VMs drop cached pages on their own (a build then reads
            # its sources from disk at ~90 MB/s), so the sources are read once, untimed, before every run.
            runs["cat (floor)"]()
            results[name].append(run())

    stock = statistics.median(w for w, _ in results["stock: tifffile + ShardWriter"])
    print(f"\n{n_images:,} images, {args.repeats} runs each, median; {platform.node()} "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n")
    print("| contender | seconds | images/s | vs stock | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    table = {}
    for name, values in results.items():
        wall = statistics.median(w for w, _ in values)
        rss = statistics.median(r for _, r in values)
        table[name] = {"seconds": wall, "images_per_s": n_images / wall, "speedup": stock / wall, "rss_mib": rss,
                       "runs": values}
        print(f"| {name} | {wall:.2f} | {n_images / wall:,.0f} | {stock / wall:.1f}x | {rss:.0f} |")
    stages = stage_table(work, n_images)
    memory = memory_scaling(work, [int(v) for v in args.memory_sizes.split(",") if v], args.shard_size)
    if args.json:
        args.json.write_text(json.dumps({"images": n_images, "results": table, "stages": stages, "memory": memory},
                                        indent=2))


def stage_table(work: Path, n_images: int) -> dict[str, dict]:
    """Per-stage seconds of the last run of each build, from its own run.json (`seconds` are the driver's
    wall-clock laps; `stages` are the wall time each pool pass took)."""
    found = {}
    for run in sorted(work.glob("ours-*/run.json")):
        info = json.loads(run.read_text())
        found[run.parent.name] = {"laps": info["seconds"], "pool": info.get("stages", {})}
    if found:
        names = sorted({k for f in found.values() for k in f["laps"] if k != "total"},
                       key=["scan", "decode", "dihedral", "dedup+folds", "write", "checksums"].index)
        print("\n| build (last run) | " + " | ".join(names) + " | total |")
        print("|---|" + "---:|" * (len(names) + 1))
        for build, f in found.items():
            cells = [f"{f['laps'][k]:.2f} s ({n_images / f['laps'][k]:,.0f}/s)" if f["laps"].get(k) else "-"
                     for k in names]
            print(f"| {build} | " + " | ".join(cells) + f" | {f['laps']['total']:.2f} s |")
        print("\npool passes (seconds): " + "; ".join(
            f"{b}: " + ", ".join(f"{k} {v:.2f}" for k, v in f["pool"].items()) for b, f in found.items()))
    return found


def memory_scaling(work: Path, sizes: list[int], shard: int) -> dict[int, float]:
    """Peak RSS of a three-format build of `n` train images (plus n/4 test) for each n."""
    peaks = {}
    for n in sizes:
        src = work / f"mem-{n}"
        if not (src / "train_labels.csv").exists():
            subprocess.run([sys.executable, "-m", "pcam_prep", "synth", str(src), "--train", str(n), "--test",
                            str(n // 4), "--seed", "11"], check=True, stdout=subprocess.DEVNULL)
        out = work / f"mem-out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        _, peaks[n] = timed([sys.executable, "-m", "pcam_prep", "build", "--src", str(src), "--out", str(out),
                             "--shard-size", str(shard)])
        shutil.rmtree(out, ignore_errors=True)
    if peaks:
        print("\n| images (train + test) | peak RSS MiB, all three formats |\n|---:|---:|")
        for n, peak in peaks.items():
            print(f"| {n + n // 4:,} | {peak:.0f} |")
    return peaks


if __name__ == "__main__":
    main()
