"""Zarr v3 and HDF5 array stores with the same paths: {split}/x, y, id, fold.

Both are created up front by the driver with their full shapes; image rows are then
filled chunk-aligned by many tasks in parallel: Zarr tasks open the store by path and own
whole shard files; HDF5 tasks write whole unfiltered chunks at byte offsets HDF5 fixed when it
created the file (HDF5 itself has no safe concurrent writers without MPI; a compressed file
is filled by one task through h5py).

Zarr `x` uses zarr's sharding codec: one file per `chunk_rows` images (a shard), holding
uncompressed inner chunks of a few images and a crc32c-checked index at its end. Stock
`zarr.open(...)` reads it; `readers.ArrayReader` maps the shard files and copies rows
straight out of them (README "Zarr layout" has the figures behind these choices).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import PcamPrepError
from ..files import DIRECT_ALIGN, DirectWriter, tmp_path
from ..schema import RowSource, zarr_shard_body, zarr_shard_key, zarr_shard_tail, zarr_sharding

# zarr and h5py are imported where used: a wds-only build never pays for them (~0.3 s).

# Images per inner chunk of a Zarr shard (at most; it must divide the shard). Uncompressed: on
# the synthetic patches Blosc-LZ4 per image came out 0.1 % larger and halved the loader's rate
# (a decode per row). 16 rather than 1 image: zarr encodes and reads each inner chunk through
# its codec pipeline, so 1-image chunks wrote at half the rate and cut stock zarr's sequential
# reads (verify, stats) ~6x; ArrayReader's mapped rows do not care (README "Zarr layout").
ZARR_INNER_ROWS = 16
# HDF5 filters every reader has built in. Measured on 96x96 patches: lzf ~360 us/image for a
# ratio of ~1.0 and gzip is slower still, so the default is none; readers such as
# torchvision's PCAM need no plugin either way.
HDF5_CODECS = {"none": None, "lzf": "lzf", "gzip": "gzip"}
_HDF5_ALIGN_ABOVE = 64 * 1024  # objects of at least this many bytes are aligned; small metadata stays packed


def column_dtypes() -> dict[str, np.dtype | type]:
    return {"y": np.uint8, "fold": np.int8, "id": str}


def zarr_shard_rows(chunk_rows: int, n: int) -> int:
    """Images per shard file of a split of `n` images."""
    return max(1, min(chunk_rows, n))


def create_zarr(path: Path, counts: dict[str, int], shape: tuple[int, ...], chunk_rows: int) -> Path:
    """Create `{split}/x` (and the column arrays) in a fresh store at a temporary path."""
    import zarr

    tmp = tmp_path(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
    for split, n in counts.items():
        rows = zarr_shard_rows(chunk_rows, n)
        group.create_array(
            f"{split}/x", shape=(n, *shape), shards=(rows, *shape), chunks=(math.gcd(rows, ZARR_INNER_ROWS), *shape),
            dtype="uint8", compressors=None, fill_value=0,
            config={"write_empty_chunks": True},  # every inner chunk is written, all-zero images too
            chunk_key_encoding={"name": "default", "separator": "/"},  # shard i of x is x/c/i/0/0/0
        )
        for shard in range(-(-n // rows)):  # made here, before the writes: in the tasks, under their write load,
            # these directories cost ~1.4 ms a shard (~8 % of the Zarr tasks' samples at 100k); here 26 ms in all
            tmp.joinpath(split, "x", *zarr_shard_key(shard, 1 + len(shape))[:-1]).mkdir(parents=True, exist_ok=True)
    return tmp


def write_zarr_shard(store: Path, split: str, shard: int, images: np.ndarray) -> tuple[str, str]:
    """Shard file `shard` of `{split}/x` holding `images` (all its rows), written directly; (store-relative path, sha256).

    The bytes are exactly those zarr writes for the layout `create_zarr` declares (schema.zarr_sharding:
    uncompressed inner chunks in order, the last zero-padded, then the crc32c-checked index;
    tests/test_zarr.py compares the two), without zarr's per-chunk codec pipeline or the page cache.
    One writer per shard file: callers give each shard to one task.
    """
    folder = store / split / "x"
    per = zarr_sharding(json.loads((folder / "zarr.json").read_text()))
    if per is None:
        raise PcamPrepError(f"{folder}: not the Zarr layout create_zarr makes; cannot write shard {shard} directly")
    rows, image_bytes = len(images), int(np.prod(images.shape[1:]))
    if not 0 < rows <= per[0]:
        raise ValueError(f"a shard of {per[0]} rows cannot hold {rows} images")
    path = folder.joinpath(*zarr_shard_key(shard, images.ndim))
    path.parent.mkdir(parents=True, exist_ok=True)
    body = zarr_shard_body(rows, per, image_bytes)
    pieces = (np.ascontiguousarray(images), bytes(body - rows * image_bytes), zarr_shard_tail(rows, per, image_bytes))
    digest = hashlib.sha256()
    with DirectWriter(path) as fh:
        for piece in pieces:
            digest.update(piece)
            fh.write(piece)
    return path.relative_to(store).as_posix(), digest.hexdigest()


COLUMN_SLICE = 1 << 16  # rows of an id/label/fold column converted and written at once


def _write_slices(target, values: np.ndarray, dtype) -> None:
    """`target[:] = values`, a COLUMN_SLICE of rows at a time, each converted to `dtype` as it is written:
    zarr's and h5py's string conversions stay one slice big, not the whole column."""
    for start in range(0, len(values), COLUMN_SLICE):
        target[start : start + COLUMN_SLICE] = np.asarray(values[start : start + COLUMN_SLICE], dtype=dtype)


def write_zarr_columns(store: Path, split: str, columns: dict[str, np.ndarray]) -> None:
    import zarr

    group = zarr.open_group(store=str(store), mode="r+")
    for name, values in columns.items():
        dtype = column_dtypes()[name]
        chunk = min(max(1, len(values)), COLUMN_SLICE)  # a slice is a whole chunk
        array = group.create_array(f"{split}/{name}", shape=(len(values),), chunks=(chunk,), dtype=dtype)
        _write_slices(array, values, dtype if dtype is not str else np.dtypes.StringDType())


def finish_store(tmp: Path, final: Path) -> None:
    """Swap a completed store into place."""
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


def create_hdf5(
    path: Path, shape: tuple[int, ...], chunk_rows: int, splits: dict[str, tuple[int, dict[str, np.ndarray]]],
    codec: str = "none",
) -> Path:
    """Create `pcam.h5` under its temporary name: empty `x` datasets and the id/label/fold columns.

    `splits[name] = (count, columns)`. The driver writes the columns, which it holds anyway, so
    the task that fills `x` gets only where to read pixels from, not every id of the dataset.
    """
    import h5py

    tmp = tmp_path(path)
    # No timestamps (track_times=False) so the same data gives the same bytes.
    # Large objects (the image chunks) start on DIRECT_ALIGN boundaries, so tasks can write them with O_DIRECT.
    with h5py.File(tmp, "w", libver=("v110", "v110"), track_order=False, alignment_threshold=_HDF5_ALIGN_ABOVE,
                   alignment_interval=DIRECT_ALIGN) as fh:
        for split, (n, columns) in splits.items():
            group = fh.create_group(split)
            direct = {}
            if n and HDF5_CODECS[codec] is None:  # every chunk's bytes placed now, written later by many tasks
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                direct = {"dcpl": dcpl, "fill_time": "never"}
            group.create_dataset(
                "x", shape=(n, *shape), dtype=np.uint8, chunks=(max(1, min(chunk_rows, n)), *shape) if n else None,
                compression=HDF5_CODECS[codec] if n else None, track_times=False, **direct,
            )
            for name, values in columns.items():
                dtype = column_dtypes()[name]
                h5dtype = h5py.string_dtype("utf-8") if dtype is str else dtype
                column = group.create_dataset(name, shape=(len(values),), dtype=h5dtype, track_times=False)
                _write_slices(column, values, object if dtype is str else dtype)
    return tmp


def hdf5_chunk_offsets(path: Path, split: str) -> tuple[np.ndarray, int] | None:
    """(byte offset of each chunk of `{split}/x` in row order, rows per chunk); None unless the chunks are
    unfiltered and all allocated (create_hdf5 with codec none), i.e. plain C-order bytes any process may write.

    Rows per chunk come from the file, never from the config: a split smaller than `chunk_rows` has
    smaller chunks, and padding one to `chunk_rows` would overwrite the datasets after it."""
    import h5py

    with h5py.File(path, "r") as fh:
        x = fh[f"{split}/x"]
        if x.chunks is None or x.id.get_create_plist().get_nfilters() or not len(x):
            return None
        per, count = x.chunks[0], -(-len(x) // x.chunks[0])
        if x.id.get_num_chunks() != count:
            return None
        offsets = np.empty(count, np.int64)
        for i in range(count):
            info = x.id.get_chunk_info(i)
            offsets[info.chunk_offset[0] // per] = info.byte_offset
    return offsets, per


def write_hdf5_chunks(path: Path, offsets: np.ndarray, chunk_rows: int, start: int, images: np.ndarray) -> None:
    """Rows [start, start+len) of an `x` whose chunks lie at `offsets`, as whole chunks written in place.

    HDF5 has one writer, but unfiltered, early-allocated chunks are fixed byte ranges of the file:
    tasks writing disjoint chunks with pwrite need no HDF5 library at all, and stock h5py reads
    the result. An edge chunk is padded with zeros, so the file's bytes depend only on the images.
    """
    if start % chunk_rows:
        raise ValueError(f"HDF5 rows must start on a chunk boundary ({chunk_rows} rows), got row {start}")
    chunk_bytes = chunk_rows * int(np.prod(images.shape[1:]))
    aligned = chunk_bytes % DIRECT_ALIGN == 0 and not (offsets % DIRECT_ALIGN).any()
    with DirectWriter(path, direct=aligned, create=False) as fh:
        for at in range(0, len(images), chunk_rows):
            fh.write_at(_hdf5_chunk(images[at : at + chunk_rows], chunk_rows), int(offsets[(start + at) // chunk_rows]))


def _hdf5_chunk(images: np.ndarray, chunk_rows: int) -> np.ndarray:
    """The bytes of one `x` chunk holding `images`: C order, an edge chunk zero-padded to `chunk_rows` rows."""
    part = np.ascontiguousarray(images).reshape(-1)
    chunk_bytes = chunk_rows * int(np.prod(images.shape[1:]))
    return part if len(part) == chunk_bytes else np.concatenate([part, np.zeros(chunk_bytes - len(part), np.uint8)])


def hdf5_digest(path: Path, chunks: dict[str, tuple[np.ndarray, int]], sources: dict[str, RowSource],
                shape: tuple[int, int, int]) -> str:
    """sha256 of an unfiltered HDF5 file whose `x` chunks `write_hdf5_chunks` filled from `sources`.

    The chunk ranges (`chunks[split] = (offsets, rows per chunk)`, hdf5_chunk_offsets) are hashed from
    the images themselves, rebuilt from the sources as `write_hdf5_chunks` wrote them (zero-padded
    edge chunk included); everything between and after them (h5py's metadata and the small columns)
    is read from the file. Same digest as hashing the file, without reading the GBs of chunks back
    from the disk they were just written to (that read competed with the shard writes); the shards
    and Zarr files are likewise hashed from the bytes written. `verify` reads the file itself.
    """
    image_bytes = int(np.prod(shape))
    order = sorted((int(offset), split, i) for split, (offsets, _) in chunks.items() for i, offset in enumerate(offsets))
    blocks = {split: iter(sources[split].blocks(shape, per)) for split, (_, per) in chunks.items()}
    expected = dict.fromkeys(chunks, 0)
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        size, at = os.fstat(fh.fileno()).st_size, 0

        def copy(stop: int) -> None:  # file bytes [at, stop)
            nonlocal at
            while at < stop:
                data = os.pread(fh.fileno(), min(stop - at, 1 << 22), at)
                if not data:
                    raise PcamPrepError(f"{path} ends at byte {at}, before its chunks do (byte {stop})")
                digest.update(data)
                at += len(data)

        for offset, split, i in order:
            per = chunks[split][1]
            if offset < at:
                raise PcamPrepError(f"{path}: chunk {i} of {split}/x at byte {offset} overlaps the one before it")
            copy(offset)
            if i != expected[split]:  # h5py allocates chunks in row order; any other order restarts the reader
                blocks[split] = iter(sources[split].part(i * per, len(sources[split])).blocks(shape, per))
            expected[split] = i + 1
            digest.update(_hdf5_chunk(next(blocks[split])[1], per))  # the bytes write_hdf5_chunks writes
            at = offset + per * image_bytes
        if at > size:
            raise PcamPrepError(f"{path} ends at byte {size}, before its last chunk does (byte {at})")
        copy(size)
    return digest.hexdigest()


def fill_hdf5(tmp: Path, path: Path, splits: dict[str, Iterable[tuple[int, np.ndarray]]]) -> None:
    """Write each split's `(start, images)` blocks into the file `create_hdf5` made, then rename it into place."""
    import h5py

    try:
        fh = h5py.File(tmp, "r+")
    except OSError as exc:  # e.g. a retried task: the file is still marked open by the writer that died
        raise PcamPrepError(f"{tmp} cannot be reopened to write images ({exc}); run the build again") from None
    with fh:
        for split, blocks in splits.items():
            x = fh[f"{split}/x"]
            for start, images in blocks:
                x[start : start + len(images)] = images
    os.replace(tmp, path)
