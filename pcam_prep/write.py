"""Write-stage tasks: gather rows from the spills, write one output piece, report on it.

Each function takes only paths, arrays and plain values (never open handles), so it can run
in a thread, a process or on a remote dask worker that sees the same filesystem.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .loader import pixels_view
from .schema import SampleLayout, torchvision_name
from .validate import load_images
from .writers import arrays, sha256_file, torchvision, wds

FORMAT_VERSION = 1  # bump when the shard byte layout changes: old shards are then rewritten
BLOCK_ROWS = 512  # images in memory per task at a time: ~14 MB at 96x96


@dataclass(frozen=True)
class Files:
    """Rows that come from the source files (re-read and checked against their stamps)."""

    paths: list[str]
    stamps: list[tuple[int, int]]  # (size, mtime_ns) at inspection

    def __len__(self) -> int:
        return len(self.paths)

    def part(self, start: int, stop: int) -> Files:
        return Files(self.paths[start:stop], self.stamps[start:stop])

    def blocks(self, shape: tuple[int, int, int], rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self.paths), rows):
            stop = start + rows
            yield start, load_images(self.paths[start:stop], self.stamps[start:stop], shape)


@dataclass(frozen=True)
class ShardRows:
    """Rows that come from shards this build already wrote: a memcpy, no file per image."""

    spans: list[tuple[str, int, int, int]]  # (shard path, count in shard, first row, stop row)
    labelled: bool

    def __len__(self) -> int:
        return sum(stop - first for _, _, first, stop in self.spans)

    def blocks(self, shape: tuple[int, int, int], rows: int) -> Iterator[tuple[int, np.ndarray]]:
        # pread into one buffer rather than mmap: mapped shard pages would count towards this
        # worker's RSS and grow with the dataset; this stays at one block.
        layout = SampleLayout(tuple(shape), self.labelled)
        out = np.empty((rows, *shape), np.uint8)
        raw = np.empty(rows * layout.stride, np.uint8)
        filled = start = 0
        for path, _, first, stop in self.spans:
            with open(path, "rb", buffering=0) as fh:
                while first < stop:
                    take = min(stop - first, rows - filled)
                    chunk = raw[: take * layout.stride]
                    fh.seek(first * layout.stride)
                    if fh.readinto(chunk) != chunk.size:
                        raise OSError(f"{path}: shard shorter than its {stop} samples")
                    out[filled : filled + take] = pixels_view(chunk, layout, take)
                    filled, first = filled + take, first + take
                    if filled == rows:
                        yield start, out
                        start, filled = start + rows, 0
        if filled:
            yield start, out[:filled]


Sources = Files | ShardRows  # or any source with the same blocks()/part()/stamps, e.g. sources.pcam_h5.H5Rows


@dataclass(frozen=True)
class PieceResult:
    """One written piece: a shard, a row range of a store, or a whole file."""

    kind: str  # wds | zarr | hdf5 | torchvision-h5
    split: str
    path: str
    count: int
    sha256: str | None  # None for pieces of a directory store
    digests: dict[str, str] | None = None  # store-relative path -> sha256 of the chunk files this piece wrote


def write_wds_piece(
    path: str, split: str, shape: tuple[int, int, int], ids: list[str], labels: np.ndarray | None, sources: Files
) -> PieceResult:
    """Write one shard, or keep the finished one from an earlier run if it is provably the same."""
    plan = piece_plan(shape, ids, labels, sources)
    reused = wds.reuse_finished(Path(path), plan)
    if reused is not None:
        return PieceResult("wds", split, path, reused.count, reused.sha256)
    layout = SampleLayout(tuple(shape), labels is not None)
    blocks = (
        (ids[start : start + len(images)], images, None if labels is None else labels[start : start + len(images)])
        for start, images in sources.blocks(shape, BLOCK_ROWS)
    )
    result = wds.write_shard(Path(path), layout, blocks)
    wds.mark_finished(result, plan)
    return PieceResult("wds", split, path, result.count, result.sha256)


def piece_plan(shape, ids: list[str], labels: np.ndarray | None, sources: Files) -> str:
    """A digest of everything a piece's bytes depend on: same plan, same bytes."""
    digest = hashlib.sha256(repr((tuple(shape), FORMAT_VERSION)).encode())
    digest.update("\n".join(ids).encode())
    digest.update(b"" if labels is None else np.asarray(labels, np.uint8).tobytes())
    digest.update(repr([tuple(s) for s in sources.stamps]).encode())
    return digest.hexdigest()


def write_zarr_piece(
    store: str, split: str, start: int, shape: tuple[int, int, int], sources: Sources, chunk_rows: int
) -> PieceResult:
    rows = max(chunk_rows, BLOCK_ROWS // chunk_rows * chunk_rows)  # whole chunks per write
    for offset, images in sources.blocks(shape, rows):
        arrays.write_zarr_rows(Path(store), split, start + offset, images)
    chunks = range(start // chunk_rows, -(-(start + len(sources)) // chunk_rows))
    files = arrays.chunk_files(Path(store), split, chunks)
    digests = {rel: sha256_file(Path(store) / rel) for rel in files}  # hashed here, in parallel
    return PieceResult("zarr", split, store, len(sources), None, digests)


def write_hdf5_piece(
    tmp: str, path: str, shape: tuple[int, int, int], chunk_rows: int, splits: dict[str, Sources]
) -> PieceResult:
    """Every image of the HDF5 file `arrays.create_hdf5` made at `tmp`, in one task (HDF5 has one writer)."""
    rows = max(chunk_rows, BLOCK_ROWS // chunk_rows * chunk_rows)
    arrays.fill_hdf5(Path(tmp), Path(path), {name: src.blocks(shape, rows) for name, src in splits.items()})
    count = sum(len(src) for src in splits.values())
    return PieceResult("hdf5", "all", path, count, sha256_file(Path(path)))


def write_torchvision_piece(
    folder: str, split: str, shape: tuple[int, int, int], labels: np.ndarray, sources: Sources
) -> tuple[PieceResult, PieceResult]:
    """One split as torchvision's PCAM x and y files, in the split's row order."""
    x_path, y_path = (Path(folder) / torchvision_name(split, m) for m in ("x", "y"))
    torchvision.write_pair(x_path, y_path, tuple(shape), labels, sources.blocks(shape, BLOCK_ROWS))
    return tuple(PieceResult("torchvision-h5", split, str(p), len(labels), sha256_file(p)) for p in (x_path, y_path))
