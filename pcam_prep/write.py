"""Write-stage tasks: gather rows from the spills, write one output piece, report on it.

Each function takes only paths, arrays and plain values (never open handles), so it can run
in a thread, a process or on a remote dask worker that sees the same filesystem.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .schema import SampleLayout
from .validate import load_images
from .writers import arrays, sha256_file, wds

FORMAT_VERSION = 1  # bump when the shard byte layout changes: old shards are then rewritten
BLOCK_ROWS = 512  # images in memory per task at a time: ~14 MB at 96x96


def image_blocks(sources: Sources, shape: tuple[int, int, int], rows: int = BLOCK_ROWS):
    """(start, images) blocks of the accepted files, `rows` at a time."""
    paths, stamps = sources
    for start in range(0, len(paths), rows):
        yield start, load_images(paths[start : start + rows], stamps[start : start + rows], shape)


Sources = tuple[list[str], list[tuple[int, int]]]  # paths and their (size, mtime_ns) at inspection


@dataclass(frozen=True)
class PieceResult:
    """One written piece: a shard, a row range of a store, or a whole file."""

    kind: str  # wds | zarr | hdf5
    split: str
    path: str
    count: int
    sha256: str | None  # None for pieces of a directory store (hashed once at the end)


def write_wds_piece(
    path: str, split: str, shape: tuple[int, int, int], ids: list[str], labels: np.ndarray | None, sources: Sources
) -> PieceResult:
    """Write one shard, or keep the finished one from an earlier run if it is provably the same."""
    plan = piece_plan(shape, ids, labels, sources)
    reused = wds.reuse_finished(Path(path), plan)
    if reused is not None:
        return PieceResult("wds", split, path, reused.count, reused.sha256)
    layout = SampleLayout(tuple(shape), labels is not None)
    blocks = (
        (ids[start : start + len(images)], images, None if labels is None else labels[start : start + len(images)])
        for start, images in image_blocks(sources, shape)
    )
    result = wds.write_shard(Path(path), layout, blocks)
    wds.mark_finished(result, plan)
    return PieceResult("wds", split, path, result.count, result.sha256)


def piece_plan(shape, ids: list[str], labels: np.ndarray | None, sources: Sources) -> str:
    """A digest of everything a piece's bytes depend on: same plan, same bytes."""
    digest = hashlib.sha256(repr((tuple(shape), FORMAT_VERSION)).encode())
    digest.update("\n".join(ids).encode())
    digest.update(b"" if labels is None else np.asarray(labels, np.uint8).tobytes())
    digest.update(repr([tuple(s) for s in sources[1]]).encode())
    return digest.hexdigest()


def write_zarr_piece(
    store: str, split: str, start: int, shape: tuple[int, int, int], sources: Sources, chunk_rows: int
) -> PieceResult:
    rows = max(chunk_rows, BLOCK_ROWS // chunk_rows * chunk_rows)  # whole chunks per write
    for offset, images in image_blocks(sources, shape, rows):
        arrays.write_zarr_rows(Path(store), split, start + offset, images)
    return PieceResult("zarr", split, store, len(sources[0]), None)


def write_hdf5_piece(
    path: str, shape: tuple[int, int, int], chunk_rows: int,
    splits: dict[str, tuple[dict[str, np.ndarray], Sources]], codec: str,
) -> PieceResult:
    """The whole HDF5 file in one task. `splits[name] = (columns, sources)`."""
    rows = max(chunk_rows, BLOCK_ROWS // chunk_rows * chunk_rows)
    plan = {
        name: (len(src[0]), columns, image_blocks(src, shape, rows)) for name, (columns, src) in splits.items()
    }
    arrays.write_hdf5(Path(path), tuple(shape), chunk_rows, plan, codec)
    count = sum(len(src[0]) for _, src in splits.values())
    return PieceResult("hdf5", "all", path, count, sha256_file(Path(path)))
