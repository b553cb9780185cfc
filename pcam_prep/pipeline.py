"""`pcam-prep build`: the Dask wiring of the stages, top to bottom as the data flows.

    inventory = scan(src)                        files + labels, no pixels
    reports   = inspect(batches)   [parallel]    decode, validate, sha1, moments
    samples   = collect(reports)                 kept rows + decode rejects
    kept      = dedup(samples)                   exact / conflicting / train-test
    folds     = assign_folds(kept)               stratified (group) k-fold
    pieces    = write(plan)        [parallel]    re-read, write wds shards, zarr ranges, one hdf5
    manifest  = describe(pieces)                 written last: a folder with one is whole
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from dask import delayed

from . import PcamPrepError
from .config import BuildConfig
from .dedup import Dedup, dedup
from .executor import Executor, ProgressFn
from .folds import assign_folds
from .schema import (
    DUPLICATES_NAME,
    HDF5_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    RUN_INFO_NAME,
    WDS_DIR,
    ZARR_NAME,
    SampleLayout,
    image_shape,
    shard_name,
)
from .sources.kaggle import REJECT_COLUMNS, Inventory, resolve_layout, scan
from .stats import Moments, channel_moments, merge
from .validate import inspect_batch, load_images
from .write import Files, PieceResult, ShardRows, Sources, write_hdf5_piece, write_wds_piece, write_zarr_piece
from .writers import arrays, sha256_file, sha256_tree
from .writers.manifest import (
    file_entry,
    package_versions,
    write_json_atomic,
    write_manifest,
)
from .writers.wds import remove_with_marker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildSummary:
    out: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]


@dataclass(frozen=True)
class Analysis:
    """Everything a build knows before it writes: what is kept, in output order, and why not."""

    train: pd.DataFrame  # id, path, label, digest, stamp, fold; ordered by (fold, id)
    test: pd.DataFrame  # id, path, digest, stamp; ordered by id
    rejects: pd.DataFrame  # id, path, reason, detail
    dedup: Dedup
    moments: Moments  # exact pixel moments of the kept train images
    shape: tuple[int, int, int]


def analyse(config: BuildConfig, executor: Executor, clock: _Clock | None = None) -> Analysis:
    """Scan, decode, validate, dedup, measure and fold-assign; write nothing."""
    clock = clock or _Clock()
    shape = image_shape(config.image_size)
    inventory = scan(resolve_layout(config.src, config.labels, config.test, config.no_test))
    groups = read_groups(config.groups) if config.groups else None
    clock.lap("scan")
    decoded, test, rejects, moments = inspect(executor, inventory, shape, config)
    clock.lap("decode")
    result = dedup(decoded, test)
    train = result.train
    moments = kept_moments(moments, decoded, train, shape)
    train["fold"] = assign_folds(train, config.folds, config.seed, groups)
    train = train.sort_values(["fold", "id"], kind="stable", ignore_index=True)
    test = test.sort_values("id", kind="stable", ignore_index=True)
    clock.lap("dedup+folds")
    return Analysis(train, test, rejects, result, moments, shape)


def build(config: BuildConfig, progress: ProgressFn | None = None) -> BuildSummary:
    """Build every requested format from a Kaggle-layout folder into `config.out`."""
    clock = _Clock()
    out = config.out.resolve()
    _prepare_out(out)
    preload = tuple(m for f, m in (("zarr", "zarr"), ("hdf5", "h5py")) if f in config.formats)
    with Executor(config.scheduler, config.n_workers, progress, preload) as executor:
        found = analyse(config, executor, clock)
        pieces = write_outputs(executor, out, found.train, found.test, found.shape, config)
        clock.lap("write")
    files = describe_files(out, config, found.train, found.test, pieces)
    files += write_tables(out, found.rejects, found.dedup.duplicates)
    manifest = describe(config, found, files)
    clock.lap("checksums")
    write_json_atomic(out / RUN_INFO_NAME, _run_info(config, executor, clock.laps))
    write_manifest(out, manifest)
    return BuildSummary(out, manifest, clock.laps)


def _prepare_out(out: Path) -> None:
    """Remove the old manifest first: from here until the new one lands, OUT is not whole."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)


def read_groups(path: Path) -> pd.Series:
    """`id,group` CSV (e.g. slide ids) as a Series id -> group."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"id", "group"} <= set(frame.columns):
        raise PcamPrepError(f"--groups {path}: expected columns id,group, found {list(frame.columns)}")
    return frame.drop_duplicates("id").set_index("id")["group"]


def inspect(executor: Executor, inventory: Inventory, shape: tuple[int, int, int], config: BuildConfig):
    """Decode every file in parallel batches; return kept train/test rows, rejects, moments."""
    batches = []
    for split, frame in (("train", inventory.train), ("test", inventory.test)):
        for start in range(0, len(frame), config.batch_size):
            batches.append((split, frame.iloc[start : start + config.batch_size]))
    tasks = [
        delayed(inspect_batch, pure=False)(list(rows["path"]), shape, config.keep_blank, split == "train")
        for split, rows in batches
    ]
    reports = executor.run("decode", tasks, [len(rows) for _, rows in batches])
    kept: dict[str, list[pd.DataFrame]] = {"train": [], "test": []}
    rejects = [inventory.rejects]
    for (split, rows), report in zip(batches, reports):
        ok = report.ok
        good = rows[ok].copy()
        good["digest"] = [d for d, keep in zip(report.digests, ok) if keep]
        good["stamp"] = [s for s, keep in zip(report.stamps, ok) if keep]
        kept[split].append(good)
        bad = ~ok
        rejects.append(pd.DataFrame({
            "id": rows["id"][bad].to_numpy(),
            "path": [os.path.relpath(p, inventory.layout.root) for p in rows["path"][bad]],
            "reason": [r for r, b in zip(report.reasons, bad) if b],
            "detail": [d for d, b in zip(report.details, bad) if b],
        }))
    frames = {s: pd.concat(f, ignore_index=True) if f else _empty(s) for s, f in kept.items()}
    rejects = pd.concat(rejects, ignore_index=True)[REJECT_COLUMNS].sort_values(["reason", "id"], ignore_index=True)
    moments = merge([r.moments for r in reports if r.moments is not None])
    return frames["train"], frames["test"], rejects, moments


def kept_moments(decoded: Moments, train: pd.DataFrame, kept: pd.DataFrame, shape) -> Moments:
    """Moments of the kept train images: everything decoded minus what dedup dropped."""
    dropped = train[~train["id"].isin(kept["id"])]
    if dropped.empty:
        return decoded
    return decoded - channel_moments(load_images(list(dropped["path"]), list(dropped["stamp"]), shape))


def _empty(split: str) -> pd.DataFrame:
    columns = {"id": [], "path": [], "digest": [], "stamp": []}
    if split == "train":
        columns["label"] = []
    return pd.DataFrame(columns)


def _files(frame: pd.DataFrame, rows=slice(None)) -> Files:
    return Files(list(frame["path"].iloc[rows]), list(frame["stamp"].iloc[rows]))


def write_outputs(executor, out, train, test, shape, config) -> list[PieceResult]:
    """Write the shards first; the arrays then copy from them (one read of each source file)."""
    frames = {"train": train, "test": test}
    pieces: list[PieceResult] = []
    rows: dict[str, Sources] = {split: _files(frame) for split, frame in frames.items()}
    if "wds" in config.formats:
        (out / WDS_DIR).mkdir(exist_ok=True)
        plan = _wds_plan(out, train, test, config)
        pieces += executor.run("shards", [_wds_task(piece, frames, shape) for piece in plan], [p.count for p in plan])
        rows = {split: ShardRows([(str(p.path), p.count, 0, p.count) for p in plan if p.split == split],
                                 split == "train") for split in frames}
        _remove_stale_shards(out, {p.path.name for p in plan})
    tasks, units, zarr_tmp = [], [], None
    if "zarr" in config.formats:
        zarr_tmp = arrays.create_zarr(out / ZARR_NAME, {s: len(f) for s, f in frames.items()}, shape, config.chunk_rows)
        step = config.chunk_rows * max(1, 2048 // config.chunk_rows)
        for split, frame in frames.items():
            arrays.write_zarr_columns(zarr_tmp, split, _columns(frame, labelled=split == "train"))
            tasks += [delayed(write_zarr_piece, pure=False)(str(zarr_tmp), split, s, shape,
                                                            _slice(rows[split], s, s + step), config.chunk_rows)
                      for s in range(0, len(frame), step)]
            units += [min(step, len(frame) - s) for s in range(0, len(frame), step)]
    if "hdf5" in config.formats:
        splits = {split: (_columns(frame, labelled=split == "train"), rows[split]) for split, frame in frames.items()}
        tasks.insert(0, delayed(write_hdf5_piece, pure=False)(  # longest task first
            str(out / HDF5_NAME), shape, config.chunk_rows, splits, config.hdf5_codec))
        units.insert(0, len(train) + len(test))
    pieces += executor.run("arrays", tasks, units)
    if zarr_tmp is not None:
        arrays.finish_store(zarr_tmp, out / ZARR_NAME)
    return pieces


def _slice(rows: Sources, start: int, stop: int) -> Sources:
    """Rows [start, stop) of a split, from files or from the shards that hold them."""
    if isinstance(rows, Files):
        return Files(rows.paths[start:stop], rows.stamps[start:stop])
    spans, offset = [], 0
    for path, count, first, end in rows.spans:
        lo, hi = max(start, offset), min(stop, offset + end - first)
        if lo < hi:
            spans.append((path, count, first + lo - offset, first + hi - offset))
        offset += end - first
    return ShardRows(spans, rows.labelled)


@dataclass(frozen=True)
class ShardPlan:
    split: str
    fold: int | None
    path: Path
    rows: np.ndarray  # positions in the split's (fold, id) order

    @property
    def count(self) -> int:
        return len(self.rows)


def _wds_plan(out: Path, train: pd.DataFrame, test: pd.DataFrame, config: BuildConfig) -> list[ShardPlan]:
    """Shards in row order: train by fold, `shard_size` each, then test."""
    groups = [("train", fold, np.flatnonzero(train["fold"].to_numpy() == fold)) for fold in range(config.folds)]
    groups.append(("test", None, np.arange(len(test))))
    plan = []
    for split, fold, index in groups:
        for shard, start in enumerate(range(0, len(index), config.shard_size)):
            path = out / WDS_DIR / shard_name(split, shard, fold)
            plan.append(ShardPlan(split, fold, path, index[start : start + config.shard_size]))
    return plan


def _wds_task(piece: ShardPlan, frames: dict[str, pd.DataFrame], shape):
    frame = frames[piece.split]
    labels = frame["label"].to_numpy(np.uint8)[piece.rows] if piece.split == "train" else None
    return delayed(write_wds_piece, pure=False)(str(piece.path), piece.split, shape,
                                                list(frame["id"].iloc[piece.rows]), labels, _files(frame, piece.rows))


def _columns(frame: pd.DataFrame, labelled: bool) -> dict[str, np.ndarray]:
    columns = {"id": frame["id"].to_numpy(str)}
    if labelled:
        columns["y"] = frame["label"].to_numpy(np.uint8)
        columns["fold"] = frame["fold"].to_numpy(np.int8)
    return columns


def _remove_stale_shards(out: Path, current: set[str]) -> None:
    folder = out / WDS_DIR
    for path in list(folder.glob("*.tar")) + list(folder.glob(".*.partial")) if folder.is_dir() else ():
        if path.name not in current:
            remove_with_marker(path)


def describe_files(out, config, train, test, pieces) -> list[dict]:
    files = []
    for piece in (p for p in pieces if p.kind == "wds"):  # plan order = row order, also for >= 10 folds
        name = Path(piece.path).name
        fold = int(name.split("-")[1][1:]) if piece.split == "train" else None
        files.append(file_entry(out, Path(piece.path), "wds", piece.split, fold, piece.count, piece.sha256))
    if "zarr" in config.formats:
        known = {rel: digest for p in pieces if p.kind == "zarr" for rel, digest in (p.digests or {}).items()}
        files.append(file_entry(out, out / ZARR_NAME, "zarr", None, None, len(train) + len(test),
                                sha256_tree(out / ZARR_NAME, known)))
    for piece in (p for p in pieces if p.kind == "hdf5"):
        files.append(file_entry(out, Path(piece.path), "hdf5", None, None, piece.count, piece.sha256))
    return files


def write_tables(out: Path, rejects: pd.DataFrame, duplicates: pd.DataFrame) -> list[dict]:
    entries = []
    for name, frame in ((REJECTS_NAME, rejects), (DUPLICATES_NAME, duplicates)):
        path = out / name
        frame.to_csv(path, index=False, lineterminator="\n")
        entries.append(file_entry(out, path, "csv", None, None, len(frame), sha256_file(path)))
    return entries


def describe(config: BuildConfig, found: Analysis, files: list[dict]) -> dict[str, Any]:
    train, test, rejects, result, moments, shape = (
        found.train, found.test, found.rejects, found.dedup, found.moments, found.shape)
    per_fold = train.groupby("fold")["label"].agg(["size", "sum"]).reindex(range(config.folds), fill_value=0)
    mismatched = int((train["digest"] != train["id"]).sum() + (test["digest"] != test["id"]).sum())
    layouts = {s: SampleLayout(shape, s == "train") for s in ("train", "test")}
    return {
        "image_shape": list(shape),
        "dtype": "uint8",
        "splits": {
            "train": {"count": len(train), "positives": int(train["label"].sum()),
                      "negatives": int(len(train) - train["label"].sum())},
            "test": {"count": len(test)},
        },
        "folds": {
            "k": config.folds, "seed": config.seed, "grouped": config.groups is not None,
            "counts": [{"fold": int(f), "count": int(r["size"]), "positives": int(r["sum"]),
                        "negatives": int(r["size"] - r["sum"])} for f, r in per_fold.iterrows()],
        },
        "stats": {"mean": moments.mean, "std": moments.std, "scale": "0-1", "images": len(train)},
        "rejects": {"count": len(rejects), "by_reason": rejects["reason"].value_counts().sort_index().to_dict()},
        "duplicates": {"count": len(result.duplicates),
                       "by_kind": result.duplicates["kind"].value_counts().sort_index().to_dict(),
                       "leaked_test_images": result.leaked_test},
        "ids": {"sha1_mismatch": int(mismatched)},
        "wds": {s: {"stride": l.stride, "pixel_offset": l.pixel_offset,
                    "label_offset": l.label_offset if l.labelled else None} for s, l in layouts.items()},
        "config": config.recorded(),
        "versions": package_versions(),
        "files": files,
    }


def _run_info(config: BuildConfig, executor: Executor, laps: dict[str, float]) -> dict[str, Any]:
    return {"host": platform.node(), "cpus": os.cpu_count(), "scheduler": executor.description,
            "execution": config.execution(), "seconds": laps, "stages": executor.timings,
            "finished_unix": time.time()}


class _Clock:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 4)
        self.last = now
        self.laps["total"] = round(now - self.start, 4)
