"""Build step 7: plan the output pieces and write them in parallel.

    shards  = map(hash_hdf5_piece, write_array_rows, then write_wds_piece), started in that order
              one task per range of 256-row chunks and per tar shard, each reading its rows from the
              sources once: a chunk is one Zarr shard file and (unfiltered HDF5) one chunk written in
              place; the HDF5 file is hashed from the sources beside them and renamed after the map
    arrays  = map(write_hdf5_piece | write_torchvision_piece)
              a compressed HDF5 file (one h5py writer) and the torchvision files, rows copied from the
              finished shards
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..memory import release_freed_memory
from ..readers import ShardRows
from ..schema import (
    HDF5_NAME,
    TORCHVISION_DIR,
    TORCHVISION_SPLITS,
    WDS_DIR,
    ZARR_NAME,
    RowSource,
    SampleLayout,
    SplitSpec,
    shard_name,
    torchvision_name,
)
from ..writers import arrays
from ..writers.wds import remove_with_marker
from .analyse import Analysis
from .config import BuildConfig
from .executor import Executor
from .tasks import (
    PieceResult,
    hash_hdf5_piece,
    write_array_rows,
    write_hdf5_piece,
    write_torchvision_piece,
    write_wds_piece,
)

logger = logging.getLogger(__name__)


def write_outputs(executor: Executor, out: Path, found: Analysis, config: BuildConfig) -> list[PieceResult]:
    """Zarr and unfiltered HDF5 chunks, then the tar shards, from the sources (the HDF5 file hashed from them
    beside its chunk writers); then a compressed HDF5 file and the torchvision files, from the shards."""
    frames, shape = found.splits, found.shape
    specs = {spec.name: spec for spec in found.specs}
    pieces: list[PieceResult] = []
    sources: dict[str, RowSource] = {split: found.rows(split) for split in frames}  # made once (holding_rows)
    rows = sources  # what the second map reads: the shards once they exist
    tasks, units, bars = [], [], []  # the first map: every piece that reads the sources
    h5_tmp, direct, offsets = None, False, {}
    if "hdf5" in config.formats:
        # The columns are made here and dropped once written: none of them is held through the write stage
        h5_tmp = arrays.create_hdf5(out / HDF5_NAME, shape, config.chunk_rows,
                                    {split: (len(frame), _columns(frame, specs[split])) for split, frame in frames.items()},
                                    config.hdf5_codec)
        offsets = {split: arrays.hdf5_chunk_offsets(h5_tmp, split) for split, frame in frames.items() if len(frame)}
        direct = all(o is not None for o in offsets.values())  # unfiltered: chunks written in place, in parallel
    zarr_tmp = None
    if "zarr" in config.formats:
        zarr_tmp = arrays.create_zarr(out / ZARR_NAME, {s: len(f) for s, f in frames.items()}, shape, config.chunk_rows)
        for split, frame in frames.items():
            arrays.write_zarr_columns(zarr_tmp, split, _columns(frame, specs[split]))
    if zarr_tmp is not None or direct:
        for split, frame in frames.items():
            if not len(frame):
                continue
            chunk = arrays.zarr_shard_rows(config.chunk_rows, len(frame))  # Zarr's shard = HDF5's chunk
            hdf5 = None
            if direct:
                where, per = offsets[split]
                if per != chunk:
                    raise AssertionError(f"HDF5 chunks of {per} rows, Zarr shards of {chunk}: they must match")
                hdf5 = (str(h5_tmp), where)
            parts = _pieces(len(frame), chunk)  # whole chunks per piece: one writer per Zarr file and HDF5 chunk
            tasks += [(write_array_rows, (split, s, shape, sources[split].part(s, e), chunk,
                                          None if zarr_tmp is None else str(zarr_tmp), hdf5)) for s, e in parts]
            units += [e - s for s, e in parts]
            bars += ["+".join(f for f, on in (("zarr", zarr_tmp is not None), ("hdf5", direct)) if on)] * len(parts)
    count = sum(len(frame) for frame in frames.values())
    if h5_tmp is not None and direct:  # hashed from the sources while its chunks are written; offered first
        tasks.insert(0, (hash_hdf5_piece, (str(h5_tmp), str(out / HDF5_NAME), offsets,
                                           {split: sources[split] for split in offsets}, shape)))
        units.insert(0, count)
        bars.insert(0, "hdf5")
    plan: list[ShardPlan] = []
    if "wds" in config.formats:
        (out / WDS_DIR).mkdir(exist_ok=True)
        plan = _wds_plan(out, found, config)
        tasks += [_wds_task(piece, found, sources[piece.split]) for piece in plan]
        units += [p.count for p in plan]
        bars += ["shards"] * len(plan)
    release_freed_memory()  # the columns' conversions, freed: returned before the longest stage, not kept through it
    first = _flat(executor.map("shards", tasks, units, bars))
    pieces += [piece for piece in first if piece.kind != "hdf5-rows"]
    if h5_tmp is not None and direct:
        os.replace(h5_tmp, out / HDF5_NAME)
    if plan:
        rows = {split: ShardRows([(str(p.path), p.count, 0, p.count) for p in plan if p.split == split],
                                 specs[split].labelled) for split in frames}
        _remove_stale_shards(out, {p.path.name for p in plan})
    tasks, units, bars = [], [], []
    if h5_tmp is not None and not direct:  # lzf, gzip: one writer, through h5py, rows from the shards
        tasks.append((write_hdf5_piece, (str(h5_tmp), str(out / HDF5_NAME), shape, config.chunk_rows, rows)))
        units.append(count)
        bars.append("hdf5")
    tv_tasks, tv_units = _torchvision_tasks(out, found, rows, config.torchvision_names)
    results = executor.map("arrays", tasks + tv_tasks, units + tv_units, bars + ["torchvision"] * len(tv_tasks))
    pieces += _flat(results)
    if zarr_tmp is not None:
        arrays.finish_store(zarr_tmp, out / ZARR_NAME)
    return pieces


def _flat(results: list) -> list[PieceResult]:
    """Task results as one list of pieces: some tasks write two (Zarr and HDF5 rows, torchvision x and y)."""
    return [piece for result in results for piece in (result if isinstance(result, tuple) else (result,))]


PIECE_ROWS = 2048  # images per Zarr / HDF5 task, rounded down to whole chunks (at least one)


def _pieces(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of whole `chunk`s covering `n` rows, ~PIECE_ROWS each: one task each."""
    step = chunk * max(1, PIECE_ROWS // chunk)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


SPACE_MARGIN = 1.05  # tar end blocks, HDF5/Zarr metadata, the tables and the manifest
SPACE_SLACK = 4 * 1024 * 1024


def space_needed(out: Path, found: Analysis, config: BuildConfig) -> int:
    """Bytes the requested formats will add to OUT's filesystem, from the fixed sample layout.

    Shards are exactly `stride` bytes a sample; Zarr and HDF5 are counted uncompressed (Blosc
    LZ4 saves little on H&E pixels), so the estimate errs high. Finished shards an earlier run
    left are reused, so they are not counted again; the old Zarr and HDF5 are replaced only
    after the new ones are complete, so they are.
    """
    need = 0
    for spec in found.specs:
        n = len(found.splits[spec.name])
        layout = SampleLayout(found.shape, spec.labelled)
        if "wds" in config.formats:
            need += n * layout.stride
        need += n * layout.image_bytes * sum(f in config.formats for f in ("zarr", "hdf5"))
        if config.torchvision_names and spec.labelled:
            need += n * layout.image_bytes
    reused = sum(p.stat().st_size for p in (out / WDS_DIR).glob("*.tar")) if "wds" in config.formats else 0
    return max(0, int(need * SPACE_MARGIN) - reused) + SPACE_SLACK


def remove_partials(out: Path) -> list[str]:
    """Delete every temporary (`.NAME.partial`) file or store under OUT: after a failure none of them is whole."""
    removed = []
    for path in sorted(out.rglob(".*.partial")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.relative_to(out).as_posix())
    return removed


def _torchvision_tasks(out: Path, found: Analysis, rows: dict[str, RowSource], wanted: bool) -> tuple[list, list[int]]:
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
    tasks = [(write_torchvision_piece, (str(folder), split, found.shape,
                                        found.splits[split]["label"].to_numpy(np.uint8), rows[split]))
             for split in labelled]
    return tasks, [len(found.splits[split]) for split in labelled]


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


def _wds_task(piece: ShardPlan, found: Analysis, split_rows: RowSource):
    frame, rows = found.splits[piece.split], piece.rows
    labels = frame["label"].to_numpy(np.uint8)[rows] if "label" in frame else None
    ids = frame["id"].to_numpy()[rows].tolist()
    if len(rows) and (np.diff(rows) == 1).all():  # a run of rows: always, in the plan's fold order
        source = split_rows.part(int(rows[0]), int(rows[-1]) + 1)  # no copy of the frame (~20 ms a shard at 100k)
    else:
        source = found.reader.rows(frame.iloc[rows])
    return write_wds_piece, (str(piece.path), piece.split, found.shape, ids, labels, source)


def _columns(frame: pd.DataFrame, spec: SplitSpec) -> dict[str, np.ndarray]:
    columns = {"id": frame["id"].to_numpy(object)}  # the frame's own strings: a '<U40' copy is 160 B an id
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
