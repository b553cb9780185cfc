"""Write-stage tasks: read a piece's rows from their row source, write one output piece, report on it.

Each function takes only paths, arrays and plain values (never open handles), so it can run
in a thread, a process or on a remote dask worker that sees the same filesystem. Rows come
from a `schema.RowSource`: the source files or PCam rows for the tar shards, Zarr and unfiltered
HDF5; the finished shards for a compressed HDF5 file and the torchvision files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import sha256_file, write_behind
from ..schema import RowSource, SampleLayout, torchvision_name
from ..writers import arrays, torchvision, wds

FORMAT_VERSION = 1  # bump when the shard byte layout changes: old shards are then rewritten
BLOCK_ROWS = 512  # images in memory per task at a time: ~14 MB at 96x96


@dataclass(frozen=True)
class PieceResult:
    """One written piece: a shard, a row range of a store, or a whole file."""

    kind: str  # wds | zarr | hdf5 | torchvision-h5 | hdf5-rows (chunks of an HDF5 file not yet finished)
    split: str
    path: str
    count: int
    sha256: str | None  # None for pieces of a directory store
    digests: dict[str, str] | None = None  # store-relative path -> sha256 of the chunk files this piece wrote
    reused: bool = False  # a finished shard of an earlier run, kept because its inputs are provably the same


def write_wds_piece(
    path: str, split: str, shape: tuple[int, int, int], ids: list[str], labels: np.ndarray | None, sources: RowSource
) -> PieceResult:
    """Write one shard, or keep the finished one from an earlier run if it is provably the same."""
    plan = piece_plan(shape, ids, labels, sources)
    reused = wds.reuse_finished(Path(path), plan)
    if reused is not None:
        return PieceResult("wds", split, path, reused.count, reused.sha256, reused=True)
    layout = SampleLayout(tuple(shape), labels is not None)
    blocks = (
        (ids[start : start + len(images)], images, None if labels is None else labels[start : start + len(images)])
        for start, images in sources.blocks(shape, BLOCK_ROWS)
    )
    result = wds.write_shard(Path(path), layout, blocks)
    wds.mark_finished(result, plan)
    return PieceResult("wds", split, path, result.count, result.sha256)


def piece_plan(shape, ids: list[str], labels: np.ndarray | None, sources: RowSource) -> str:
    """A digest of everything a piece's bytes depend on: same plan, same bytes."""
    digest = hashlib.sha256(repr((tuple(shape), FORMAT_VERSION)).encode())
    digest.update("\n".join(ids).encode())
    digest.update(b"" if labels is None else np.asarray(labels, np.uint8).tobytes())
    digest.update(repr([tuple(s) for s in sources.fingerprint()]).encode())
    return digest.hexdigest()


def write_hdf5_piece(
    tmp: str, path: str, shape: tuple[int, int, int], chunk_rows: int, splits: dict[str, RowSource]
) -> PieceResult:
    """Every image of the HDF5 file `arrays.create_hdf5` made at `tmp`, in one task (HDF5 has one writer)."""
    rows = max(chunk_rows, BLOCK_ROWS // chunk_rows * chunk_rows)
    arrays.fill_hdf5(Path(tmp), Path(path), {name: src.blocks(shape, rows) for name, src in splits.items()})
    count = sum(len(src) for src in splits.values())
    return PieceResult("hdf5", "all", path, count, sha256_file(Path(path)))


def write_array_rows(split: str, start: int, shape: tuple[int, int, int], sources: RowSource, chunk_rows: int,
                     zarr_store: str | None, hdf5: tuple[str, np.ndarray] | None) -> tuple[PieceResult, ...]:
    """Rows [start, start+len(sources)) of `{split}/x` in the Zarr store and/or the unfiltered HDF5 file.

    Both cut `x` into the same `chunk_rows` blocks, so each block is read from the sources once and
    written as one Zarr shard file (no other piece touches it) and as whole HDF5 chunks in place, at
    the byte offsets `hdf5 = (file, offsets)` lists (`write_hdf5_piece` fills a compressed file).
    """
    if start % chunk_rows:
        raise ValueError(f"array rows must start on a chunk boundary ({chunk_rows} rows), got row {start}")
    digests = {}
    with write_behind():  # each file's last disk write overlaps the next block's reads and hashing
        for offset, images in sources.blocks(shape, chunk_rows):
            if zarr_store is not None:
                rel, digest = arrays.write_zarr_shard(Path(zarr_store), split, (start + offset) // chunk_rows, images)
                digests[rel] = digest
            if hdf5 is not None:
                arrays.write_hdf5_chunks(Path(hdf5[0]), hdf5[1], chunk_rows, start + offset, images)
    done = [PieceResult("zarr", split, zarr_store, len(sources), None, digests)] if zarr_store is not None else []
    if hdf5 is not None:
        done.append(PieceResult("hdf5-rows", split, hdf5[0], len(sources), None))
    return tuple(done)


def hash_hdf5_piece(tmp: str, path: str, chunks: dict[str, tuple[np.ndarray, int]], sources: dict[str, RowSource],
                    shape: tuple[int, int, int]) -> PieceResult:
    """The entry of the unfiltered HDF5 file `path`, still at `tmp`, whose chunks `write_array_rows` fills.

    Its chunks are hashed from the sources (arrays.hdf5_digest), so this runs beside the tasks that
    write them rather than after them, and nothing is read back from the disk; the driver renames
    the file once every task is done.
    """
    digest = arrays.hdf5_digest(Path(tmp), chunks, sources, shape)
    return PieceResult("hdf5", "all", path, sum(len(rows) for rows in sources.values()), digest)


def write_torchvision_piece(
    folder: str, split: str, shape: tuple[int, int, int], labels: np.ndarray, sources: RowSource
) -> tuple[PieceResult, PieceResult]:
    """One split as torchvision's PCAM x and y files, in the split's row order."""
    x_path, y_path = (Path(folder) / torchvision_name(split, m) for m in ("x", "y"))
    torchvision.write_pair(x_path, y_path, tuple(shape), labels, sources.blocks(shape, BLOCK_ROWS))
    return tuple(PieceResult("torchvision-h5", split, str(p), len(labels), sha256_file(p)) for p in (x_path, y_path))
