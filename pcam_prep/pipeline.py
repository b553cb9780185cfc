"""`pcam-prep build`: the Dask wiring of the stages, top to bottom as the data flows.

    inventory = scan_source(src)                 rows per split (tif files or PCam h5 rows) + labels, no pixels
    reports   = inspect(batches)   [parallel]    decode, validate, sha1, moments
    samples   = collect(reports)                 kept rows + decode rejects
    kept      = dedup(samples)                   exact / conflicting / train-vs-held-out leakage
    folds     = assign_folds(kept)               stratified (group) k-fold of train
    pieces    = write(plan)        [parallel]    re-read, write wds shards, zarr ranges, one hdf5
    manifest  = describe(pieces)                 written last: a folder with one is whole

Splits come from the source layout (schema.SplitSpec): Kaggle has train (labelled, folded) and
test (unlabelled); PCam has train, valid and test, all labelled. Only train is folded.
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
from .dedup import Dedup, dedup, dedup_dihedral, dihedral_digests
from .executor import Executor, ProgressFn, release_freed_memory
from .folds import assign_folds
from .schema import (
    HDF5_NAME,
    MANIFEST_NAME,
    RUN_INFO_NAME,
    TORCHVISION_DIR,
    TORCHVISION_SPLITS,
    WDS_DIR,
    ZARR_NAME,
    SplitSpec,
    image_shape,
    shard_name,
    torchvision_name,
)
from .sources import scan_source
from .sources.base import REJECT_COLUMNS, Inventory, RowReader
from .stats import Moments, channel_moments, merge
from .write import (
    BLOCK_ROWS,
    PieceResult,
    ShardRows,
    Sources,
    write_hdf5_piece,
    write_torchvision_piece,
    write_wds_piece,
    write_zarr_piece,
)
from .writers import arrays
from .writers.manifest import describe, describe_files, write_json_atomic, write_manifest, write_tables
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

    # Per split, in spec order, the kept rows: id, path, [row], [label], [group], digest, size, mtime_ns, and
    # for train fold. Train is ordered by (fold, id), every other split by id.
    splits: dict[str, pd.DataFrame]
    specs: tuple[SplitSpec, ...]
    rejects: pd.DataFrame  # id, path, reason, detail
    dedup: Dedup
    moments: Moments  # exact pixel moments of the kept train images
    shape: tuple[int, int, int]
    reader: RowReader  # how the write stage reads the kept rows again
    layout: str = "kaggle"  # the source layout: kaggle | pcam-h5
    group_by: str | None = None  # what grouped the folds: "csv" (--groups), "wsi" (PCam meta CSV) or None

    @property
    def train(self) -> pd.DataFrame:
        return self.splits["train"]

    @property
    def test(self) -> pd.DataFrame:
        return self.splits.get("test", _empty(SplitSpec("test", False)))


def analyse(config: BuildConfig, executor: Executor, clock: _Clock | None = None) -> Analysis:
    """Scan, decode, validate, dedup, measure and fold-assign; write nothing."""
    clock = clock or _Clock()
    shape = image_shape(config.image_size)
    inventory = scan_source(config, shape)
    clock.lap("scan")
    decoded, rejects, moments = inspect(executor, inventory, shape, config)
    clock.lap("decode")
    result = dedup(decoded, inventory.specs)
    if config.near_duplicates:
        result = dedup_dihedral(result, dihedral_stage(executor, result, inventory.reader, shape, config),
                                inventory.specs)
        clock.lap("dihedral")
    moments = kept_moments(moments, inventory.reader, result.dropped, shape)
    groups, group_by = fold_groups(config, result.train)
    train = result.train
    train["fold"] = assign_folds(train, config.folds, config.seed, groups)
    splits = {"train": train.sort_values(["fold", "id"], kind="stable", ignore_index=True)}
    for spec in (s for s in inventory.specs if not s.folded):
        splits[spec.name] = result.kept[spec.name].sort_values("id", kind="stable", ignore_index=True)
    clock.lap("dedup+folds")
    return Analysis(splits, inventory.specs, rejects, result, moments, shape, inventory.reader, inventory.layout,
                    group_by)


def build(config: BuildConfig, progress: ProgressFn | None = None) -> BuildSummary:
    """Build every requested format from a Kaggle-layout folder into `config.out`."""
    clock = _Clock()
    out = config.out.resolve()
    _prepare_out(out)
    preload = tuple(m for f, m in (("zarr", "zarr"), ("hdf5", "h5py")) if f in config.formats)
    with Executor(config.scheduler, config.n_workers, progress, preload) as executor:
        found = analyse(config, executor, clock)
        release_freed_memory()
        pieces = write_outputs(executor, out, found, config)
        clock.lap("write")
    files = describe_files(out, config, found, pieces)
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


def fold_groups(config: BuildConfig, train: pd.DataFrame) -> tuple[pd.Series | None, str | None]:
    """id -> group for stratified group k-fold: --groups wins over the PCam meta CSV's slides."""
    if config.groups:
        return read_groups(config.groups), "csv"
    if "group" in train and train["group"].notna().any():
        return train.set_index("id")["group"], "wsi"  # ids are unique once dedup has run
    return None, None


def inspect(executor: Executor, inventory: Inventory, shape: tuple[int, int, int], config: BuildConfig):
    """Inspect every split in parallel batches; return kept rows per split, rejects, train moments."""
    reader = inventory.reader
    batches = [(spec, frame.iloc[start : start + config.batch_size])
               for spec in inventory.specs for frame in [inventory.splits[spec.name]]
               for start in range(0, len(frame), config.batch_size)]
    calls = [reader.inspect_call(rows, shape, config.keep_blank, spec.folded) for spec, rows in batches]
    tasks = [delayed(func, pure=False)(*args) for func, args in calls]
    reports = executor.run("decode", tasks, [len(rows) for _, rows in batches])
    kept: dict[str, list[pd.DataFrame]] = {spec.name: [] for spec in inventory.specs}
    rejects = [inventory.rejects]
    for (spec, rows), report in zip(batches, reports):
        if reader.ids_from_pixels:
            rows = rows.assign(id=report.digests)
        ok = report.ok
        good = rows[ok].copy()
        ids, digests = good["id"].to_numpy(), np.asarray(report.digests, dtype=object)[ok]
        good["digest"] = np.where(ids == digests, ids, digests)  # Kaggle ids are the digests: share the id's string
        good["size"], good["mtime_ns"] = report.stamps[ok, 0], report.stamps[ok, 1]  # int64 columns, no tuples
        kept[spec.name].append(good)
        bad = ~ok
        rejects.append(pd.DataFrame({
            "id": rows["id"][bad].to_numpy(),
            "path": reader.locate(rows[bad], inventory.root),
            "reason": [r for r, b in zip(report.reasons, bad) if b],
            "detail": [d for d, b in zip(report.details, bad) if b],
        }))
    frames = {s.name: _labels_int8(pd.concat(kept[s.name], ignore_index=True)) if kept[s.name] else _empty(s)
              for s in inventory.specs}
    rejects = pd.concat(rejects, ignore_index=True)[REJECT_COLUMNS].sort_values(["reason", "id"], ignore_index=True)
    moments = merge([r.moments for r in reports if r.moments is not None])
    return frames, rejects, moments


def dihedral_stage(executor: Executor, result: Dedup, reader: RowReader, shape, config: BuildConfig):
    """Dihedral digests of every kept image, per split (id -> digest), in tasks of `batch_size` images."""
    parts = [(name, frame.iloc[start : start + config.batch_size]) for name, frame in result.kept.items()
             for start in range(0, len(frame), config.batch_size)]
    tasks = [delayed(dihedral_digests, pure=False)(reader.rows(rows), shape) for _, rows in parts]
    found: dict[str, list[pd.Series]] = {name: [] for name in result.kept}
    for (name, rows), digests in zip(parts, executor.run("dihedral", tasks, [len(rows) for _, rows in parts])):
        found[name].append(pd.Series(digests, index=rows["id"].to_numpy(), dtype=object))
    return {name: pd.concat(series) if series else pd.Series(dtype=object) for name, series in found.items()}


def kept_moments(decoded: Moments, reader: RowReader, dropped: pd.DataFrame, shape) -> Moments:
    """Moments of the kept train images: everything decoded minus what dedup dropped."""
    if dropped.empty:
        return decoded
    return decoded - merge([channel_moments(images) for _, images in reader.rows(dropped).blocks(shape, BLOCK_ROWS)])


def _labels_int8(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype({"label": "int8"}) if "label" in frame else frame  # kept labels are 0/1


def _empty(spec: SplitSpec) -> pd.DataFrame:
    columns = {"id": [], "path": [], "digest": [], "size": [], "mtime_ns": []}
    if spec.labelled:
        columns["label"] = []
    return pd.DataFrame(columns)


def write_outputs(executor: Executor, out: Path, found: Analysis, config: BuildConfig) -> list[PieceResult]:
    """Write the shards first; the arrays then copy from them (one read of each source file)."""
    frames, shape = found.splits, found.shape
    specs = {spec.name: spec for spec in found.specs}
    pieces: list[PieceResult] = []
    rows: dict[str, Sources] = {split: found.reader.rows(frame) for split, frame in frames.items()}
    if "wds" in config.formats:
        (out / WDS_DIR).mkdir(exist_ok=True)
        plan = _wds_plan(out, found, config)
        pieces += executor.run("shards", [_wds_task(piece, found) for piece in plan], [p.count for p in plan])
        rows = {split: ShardRows([(str(p.path), p.count, 0, p.count) for p in plan if p.split == split],
                                 specs[split].labelled) for split in frames}
        _remove_stale_shards(out, {p.path.name for p in plan})
    tasks, units, zarr_tmp = [], [], None
    if "zarr" in config.formats:
        zarr_tmp = arrays.create_zarr(out / ZARR_NAME, {s: len(f) for s, f in frames.items()}, shape, config.chunk_rows)
        step = config.chunk_rows * max(1, 2048 // config.chunk_rows)
        for split, frame in frames.items():
            arrays.write_zarr_columns(zarr_tmp, split, _columns(frame, specs[split]))
            tasks += [delayed(write_zarr_piece, pure=False)(str(zarr_tmp), split, s, shape,
                                                            _slice(rows[split], s, s + step), config.chunk_rows)
                      for s in range(0, len(frame), step)]
            units += [min(step, len(frame) - s) for s in range(0, len(frame), step)]
    if "hdf5" in config.formats:
        columns = {split: (len(frame), _columns(frame, specs[split])) for split, frame in frames.items()}
        h5_tmp = arrays.create_hdf5(out / HDF5_NAME, shape, config.chunk_rows, columns, config.hdf5_codec)
        tasks.insert(0, delayed(write_hdf5_piece, pure=False)(  # longest task first
            str(h5_tmp), str(out / HDF5_NAME), shape, config.chunk_rows, rows))
        units.insert(0, sum(len(frame) for frame in frames.values()))
    tv_tasks, tv_units = _torchvision_tasks(out, found, rows, config.torchvision_names)
    results = executor.run("arrays", tasks + tv_tasks, units + tv_units)
    pieces += [piece for result in results for piece in (result if isinstance(result, tuple) else (result,))]
    if zarr_tmp is not None:
        arrays.finish_store(zarr_tmp, out / ZARR_NAME)
    return pieces


def _torchvision_tasks(out: Path, found: Analysis, rows: dict[str, Sources], wanted: bool) -> tuple[list, list[int]]:
    """torchvision PCAM files of the labelled splits; files of an earlier build that this one does not write go."""
    labelled = [spec.name for spec in found.specs if spec.labelled] if wanted else []
    if wanted and len(labelled) < len(found.specs):
        logger.warning("--torchvision-names: torchvision's PCAM needs labels; not writing the unlabelled split(s) %s",
                       ", ".join(s.name for s in found.specs if not s.labelled))
    folder = out / TORCHVISION_DIR
    keep = {torchvision_name(split, member) for split in labelled for member in ("x", "y")}
    for name in {torchvision_name(s, m) for s in TORCHVISION_SPLITS for m in ("x", "y")} - keep:
        (folder / name).unlink(missing_ok=True)
    if labelled:
        folder.mkdir(exist_ok=True)
    elif folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    tasks = [delayed(write_torchvision_piece, pure=False)(
        str(folder), split, found.shape, found.splits[split]["label"].to_numpy(np.uint8), rows[split])
        for split in labelled]
    return tasks, [len(found.splits[split]) for split in labelled]


def _slice(rows: Sources, start: int, stop: int) -> Sources:
    """Rows [start, stop) of a split, from the source or from the shards that hold them."""
    if not isinstance(rows, ShardRows):
        return rows.part(start, stop)
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


def _wds_plan(out: Path, found: Analysis, config: BuildConfig) -> list[ShardPlan]:
    """Shards in row order: train by fold, `shard_size` each, then each other split."""
    groups = []
    for spec in found.specs:
        frame = found.splits[spec.name]
        if spec.folded:
            folds = frame["fold"].to_numpy()
            groups += [(spec.name, fold, np.flatnonzero(folds == fold)) for fold in range(config.folds)]
        else:
            groups.append((spec.name, None, np.arange(len(frame))))
    plan = []
    for split, fold, index in groups:
        for shard, start in enumerate(range(0, len(index), config.shard_size)):
            path = out / WDS_DIR / shard_name(split, shard, fold)
            plan.append(ShardPlan(split, fold, path, index[start : start + config.shard_size]))
    return plan


def _wds_task(piece: ShardPlan, found: Analysis):
    frame = found.splits[piece.split]
    labels = frame["label"].to_numpy(np.uint8)[piece.rows] if "label" in frame else None
    ids = list(frame["id"].iloc[piece.rows])
    return delayed(write_wds_piece, pure=False)(str(piece.path), piece.split, found.shape, ids, labels,
                                                found.reader.rows(frame.iloc[piece.rows]))


def _columns(frame: pd.DataFrame, spec: SplitSpec) -> dict[str, np.ndarray]:
    columns = {"id": frame["id"].to_numpy(str)}
    if spec.labelled:
        columns["y"] = frame["label"].to_numpy(np.uint8)
    if spec.folded:
        columns["fold"] = frame["fold"].to_numpy(np.int8)
    return columns


def _remove_stale_shards(out: Path, current: set[str]) -> None:
    folder = out / WDS_DIR
    for path in list(folder.glob("*.tar")) + list(folder.glob(".*.partial")) if folder.is_dir() else ():
        if path.name not in current:
            remove_with_marker(path)


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
