"""One checked reader per format: WebDataset shards, and the Zarr / HDF5 array stores.

Everything that reads a build goes through these two classes: the loader (batches for
training), the build's own write stage (Zarr and HDF5 are copied from the finished shards),
`verify` and the EDA. They know the byte layout from `schema` and nothing about epochs,
batches or the build.

A shard written by `build` has a fixed byte layout (schema.SampleLayout). It is read either
memory-mapped, every tar header checked once against the layout (names, sizes, the exact
npy header: no pickle, no surprise members), or in row ranges with `pread`, each range's
headers checked the same way before a pixel is used.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PcamPrepError
from .memory import scratch
from .schema import (
    IMAGE_MEMBER,
    LABEL_MEMBER,
    TAR_BLOCK,
    SampleLayout,
    pixels_view,
    zarr_shard_body,
    zarr_shard_key,
    zarr_shard_tail,
    zarr_sharding,
)


class ShardError(PcamPrepError):
    """A shard that is not exactly what `build` writes; it is refused, never guessed at."""


def _open_map(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise ShardError(f"{path} is empty")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # map pages up front: no faults per batch
        mapped = mmap.mmap(fh.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    return np.frombuffer(mapped, np.uint8)


def _names(headers: np.ndarray) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode("ascii", "replace") for row in headers[:, :100]]


def _sizes(headers: np.ndarray) -> np.ndarray:
    field = headers[:, 124:136]
    return np.array([int(bytes(row).rstrip(b"\0 ") or b"0", 8) for row in np.unique(field, axis=0)])


class ShardReader:
    """One shard of `count` samples: checked against the layout before any pixel is used.

    `mapped=True` (the loader) maps the whole shard and checks every header at once; `ids`,
    `labels` and `images` are then available. `mapped=False` (build, verify-free readers,
    EDA) only checks the shard's length and end here; `read` then checks each range it reads,
    so memory stays at one block however large the shard.
    """

    def __init__(self, path: Path, layout: SampleLayout, count: int, mapped: bool = True) -> None:
        self.path, self.layout, self.count, self.mapped = Path(path), layout, count, mapped
        self._data: np.ndarray | None = None
        self.ids: list[str] | None = None
        self.labels: np.ndarray | None = None
        if mapped:
            self._check_end(self.data)
            n, stride = count, layout.stride
            self.ids, self.labels = self._check(self.data[: n * stride].reshape(n, stride))
        else:
            self._check_end(None)

    def _check_end(self, data: np.ndarray | None) -> None:
        """The shard holds `count` samples and nothing after them but the tar end blocks."""
        n, stride = self.count, self.layout.stride
        size = data.size if data is not None else os.stat(self.path).st_size
        if size == 0:
            raise ShardError(f"{self.path} is empty")
        if size < n * stride + 2 * TAR_BLOCK:
            raise ShardError(f"{self.path}: {size} bytes cannot hold {n} samples of {stride} bytes")
        if data is None:
            with open(self.path, "rb", buffering=0) as fh:
                fh.seek(n * stride)
                end = np.frombuffer(fh.read(2 * TAR_BLOCK), np.uint8)
        else:
            end = data[n * stride : n * stride + 2 * TAR_BLOCK]
        if end.any():
            raise ShardError(f"{self.path}: unexpected member after sample {n} (shard holds more than the manifest says)")

    def _check(self, records: np.ndarray) -> tuple[list[str], np.ndarray | None]:
        """ids and labels of (n, stride) sample records, after checking every member header."""
        layout = self.layout
        image_names = _names(records[:, :TAR_BLOCK])
        ids = [name[: -len(IMAGE_MEMBER) - 1] for name in image_names]
        self._expect(image_names, [f"{i}.{IMAGE_MEMBER}" for i in ids], records[:, :TAR_BLOCK],
                     layout.image_member_size)
        header = np.frombuffer(layout.npy_header, np.uint8)
        bad = np.flatnonzero((records[:, TAR_BLOCK : layout.pixel_offset] != header).any(axis=1))
        if bad.size:
            raise ShardError(f"{self.path}: sample {ids[bad[0]]!r} .npy header is not a plain {layout.shape} uint8 "
                             "array (pickled or foreign members are refused)")
        labels = None
        if layout.labelled:
            at = layout.label_offset
            label_headers = records[:, at - TAR_BLOCK : at]
            self._expect(_names(label_headers), [f"{i}.{LABEL_MEMBER}" for i in ids], label_headers, 1)
            labels = records[:, at] - ord("0")
            if (labels > 1).any():
                raise ShardError(f"{self.path}: label of {ids[int(np.argmax(labels > 1))]!r} is not 0/1")
        return ids, labels

    def _expect(self, names: list[str], wanted: list[str], headers: np.ndarray, size: int) -> None:
        for got, want in zip(names, wanted):
            if got != want or not want.split(".")[0]:
                raise ShardError(f"{self.path}: unexpected member {got!r} where {want!r} belongs; "
                                 "only .npy/.cls members written by pcam-prep are read")
        if len(headers) and ((headers[:, 156] != ord("0")).any() or list(_sizes(headers)) != [size]):
            raise ShardError(f"{self.path}: a member has the wrong type or size (expected regular files of {size} bytes)")

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = _open_map(self.path)
        return self._data

    @property
    def images(self) -> np.ndarray:
        """All pixels as a strided (count, H, W, 3) view of the mapping (mapped readers only)."""
        return pixels_view(self.data, self.layout, self.count)

    def read(self, first: int, stop: int, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Samples [first, stop) read with pread into `out[:stop-first]`, headers checked: (images, labels)."""
        if not 0 <= first <= stop <= self.count:
            raise IndexError(f"{self.path}: samples {first}..{stop} outside 0..{self.count}")
        n, stride = stop - first, self.layout.stride
        raw = scratch("shard-read", (n * stride,))  # one buffer per thread: fresh pages cost more than the copy
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(first * stride)
            if fh.readinto(raw) != raw.size:
                raise ShardError(f"{self.path}: shorter than its {self.count} samples; rebuild or run `pcam-prep verify`")
        _, labels = self._check(raw.reshape(n, stride))
        out[:n] = pixels_view(raw, self.layout, n)
        return out[:n], None if labels is None else labels.copy()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_data"] = None  # never pickle a mapping: reopen in the worker
        return state


@dataclass(frozen=True)
class ShardRows:
    """Rows of a split that sit in finished shards: (shard path, samples in it, first row, stop row) spans.

    A `schema.RowSource`: the build's Zarr and HDF5 writers copy from these instead of
    decoding the source files again.
    """

    spans: list[tuple[str, int, int, int]]
    labelled: bool

    def __len__(self) -> int:
        return sum(stop - first for _, _, first, stop in self.spans)

    def part(self, start: int, stop: int) -> ShardRows:
        spans, offset = [], 0
        for path, count, first, end in self.spans:
            lo, hi = max(start, offset), min(stop, offset + end - first)
            if lo < hi:
                spans.append((path, count, first + lo - offset, first + hi - offset))
            offset += end - first
        return ShardRows(spans, self.labelled)

    def fingerprint(self) -> list[tuple[int, ...]]:
        raise TypeError("rows copied from shards are not a shard's own source")  # shards are written from sources

    def blocks(self, shape: tuple[int, int, int], rows: int) -> Iterator[tuple[int, np.ndarray]]:
        # pread into one buffer rather than mmap: mapped shard pages would count towards this
        # worker's RSS and grow with the dataset; this stays at one block.
        layout = SampleLayout(tuple(shape), self.labelled)
        out = np.empty((rows, *shape), np.uint8)
        filled = start = 0
        for path, count, first, stop in self.spans:
            reader = ShardReader(Path(path), layout, count, mapped=False)
            while first < stop:
                take = min(stop - first, rows - filled)
                reader.read(first, first + take, out[filled:])
                filled, first = filled + take, first + take
                if filled == rows:
                    yield start, out
                    start, filled = start + rows, 0
        if filled:
            yield start, out[:filled]


def mapped_hdf5_chunks(dataset) -> tuple[list[np.ndarray], int] | None:
    """An unfiltered HDF5 dataset's chunks as memory-mapped arrays, and the rows per chunk; None if not possible.

    h5py reads a fancy selection row by row through HDF5's hyperslab machinery (~2 ms a row
    measured); unfiltered chunks are plain C-order bytes at offsets HDF5 reports, so they can
    be mapped and gathered like shards. Filtered, unallocated or virtual layouts use h5py.
    """
    plist = dataset.id.get_create_plist()
    if plist.get_nfilters() or dataset.chunks is None or dataset.dtype != np.uint8 or not len(dataset):
        return None
    per = dataset.chunks[0]
    count = -(-len(dataset) // per)
    infos = [dataset.id.get_chunk_info(i) for i in range(dataset.id.get_num_chunks())]
    if len(infos) != count:
        return None
    with open(dataset.file.filename, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
    data = np.frombuffer(mapped, np.uint8)
    shape, nbytes = (per, *dataset.shape[1:]), per * int(np.prod(dataset.shape[1:]))
    blocks: list[np.ndarray | None] = [None] * count
    for info in infos:
        block = info.chunk_offset[0] // per
        if info.size != nbytes or info.byte_offset + nbytes > len(data):
            return None
        blocks[block] = data[info.byte_offset : info.byte_offset + nbytes].reshape(shape)
    return blocks, per


def check_zarr_shard(path: Path, size: int, tail: np.ndarray, rows: int, per: tuple[int, int],
                     image_bytes: int) -> None:
    """A shard file of `size` bytes ending in `tail` holds `rows` images as `zarr_sharding` describes, index intact."""
    import google_crc32c  # a dependency of zarr itself

    body, expected = zarr_shard_body(rows, per, image_bytes), zarr_shard_tail(rows, per, image_bytes)
    if size != body + len(expected):
        raise ShardError(f"{path}: {size} bytes, expected {body + len(expected)} for {rows} images "
                         "in uncompressed inner chunks; rebuild or run `pcam-prep verify`")
    if google_crc32c.value(tail[:-4].tobytes()) != int.from_bytes(tail[-4:].tobytes(), "little"):
        raise ShardError(f"{path}: the shard index fails its crc32c check; rebuild or run `pcam-prep verify`")
    if tail.tobytes() != expected:
        raise ShardError(f"{path}: inner chunks are not stored in order and whole, as `build` writes them")


@dataclass(frozen=True)
class ZarrShards:
    """The shard files of a Zarr `x` array in the layout `build` writes (see `zarr_sharding`).

    zarr reads every inner chunk through its codec pipeline (~0.7 ms a row measured, shuffled);
    in this layout a shard's rows are plain bytes, so they are mapped and gathered like tar
    shards, or read with pread, once each file's size and index are checked.
    """

    folder: Path  # the array's folder, {split}/x
    count: int  # images
    image: tuple[int, ...]
    per: tuple[int, int]  # rows per shard, rows per inner chunk

    @classmethod
    def open(cls, folder: Path) -> ZarrShards | None:
        """The layout of `folder/zarr.json`, or None when it is not the one `build` writes (read through zarr)."""
        meta = json.loads((folder / "zarr.json").read_text())
        per = zarr_sharding(meta)
        return cls(folder, meta["shape"][0], tuple(meta["shape"][1:]), per) if per and meta["shape"][0] else None

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.image))

    def path(self, shard: int) -> Path:
        path = self.folder.joinpath(*zarr_shard_key(shard, 1 + len(self.image)))
        if not path.is_file():
            raise ShardError(f"{path}: missing; rebuild or run `pcam-prep verify`")
        return path

    def rows(self, shard: int) -> int:
        return min(self.per[0], self.count - shard * self.per[0])

    def mapped(self) -> list[np.ndarray]:
        """Every shard as a memory-mapped (rows, H, W, 3) array, each file's size and index checked."""
        blocks, tail = [], 16 * (self.per[0] // self.per[1]) + 4
        for shard in range(-(-self.count // self.per[0])):
            path, rows = self.path(shard), self.rows(shard)
            data = _open_map(path)
            check_zarr_shard(path, data.size, data[-tail:], rows, self.per, self.image_bytes)
            blocks.append(data[: rows * self.image_bytes].reshape(rows, *self.image))
        return blocks

    def read(self, start: int, stop: int, checked: set[int]) -> np.ndarray:
        """Rows [start, stop) read with pread (memory stays at those rows); shards not in `checked` are checked first."""
        stop, per, nbytes = min(stop, self.count), self.per[0], self.image_bytes
        out = np.empty((max(0, stop - start), *self.image), np.uint8)
        flat, row = out.reshape(len(out), nbytes), start
        while row < stop:
            shard, end = row // per, min(stop, (row // per + 1) * per)
            path = self.path(shard)
            with open(path, "rb", buffering=0) as fh:
                if shard not in checked:
                    size, tail = os.fstat(fh.fileno()).st_size, 16 * (per // self.per[1]) + 4
                    index = np.frombuffer(os.pread(fh.fileno(), tail, max(0, size - tail)), np.uint8)
                    check_zarr_shard(path, size, index, self.rows(shard), self.per, nbytes)
                    checked.add(shard)
                fh.seek((row - shard * per) * nbytes)
                fh.readinto(flat[row - start : end - start])  # the size check above: the rows are all there
            row = end
        return out


def gather(blocks: list[np.ndarray], block_of: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[k] = blocks[block_of[k]][rows[k]]: one memcpy per image, straight into `out`."""
    for k, (block, row) in enumerate(zip(block_of.tolist(), rows.tolist())):
        out[k] = blocks[block][row]
    return out


class ArrayReader:
    """One split of `pcam.zarr` or `pcam.h5`, opened by path: `{split}/x`, `y`, `id`, `fold`.

    The handle is opened lazily and again after a fork, and never pickled: readers travel to
    Dask and DataLoader workers as a path. `mapped=True` gathers rows from a memory map of
    unfiltered HDF5 chunks or of the Zarr shards `build` writes; otherwise (and for any other
    layout) `take` reads through the library, zarr or h5py, and `range` of those Zarr shards
    uses pread.
    """

    def __init__(self, path: Path, kind: str, split: str, mapped: bool = True) -> None:
        if kind not in ("zarr", "hdf5"):
            raise ValueError(f"kind must be zarr or hdf5, got {kind!r}")
        self.path, self.kind, self.split = Path(path), kind, split
        self.mapped = mapped  # False: read through zarr / h5py, as other readers do (verify)
        self._handle, self._pid = None, os.getpid()
        self._chunks: tuple[list[np.ndarray], int] | bool | None = None  # mapped chunks or shards; False: not mappable
        self._shards: ZarrShards | bool | None = None  # for unmapped Zarr ranges; False: not the layout build writes
        self._checked: set[int] = set()  # Zarr shards whose index `range` has checked

    def _group(self):
        if self._handle is not None and self._pid != os.getpid():  # a forked worker: own handle
            self._handle = self._chunks = None
        if self._handle is None:
            self._pid = os.getpid()
            if self.kind == "zarr":
                import zarr

                self._handle = zarr.open_group(str(self.path), mode="r")
            else:
                import h5py

                self._handle = h5py.File(self.path, "r")
        return self._handle

    def __len__(self) -> int:
        return int(self._group()[f"{self.split}/x"].shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._group()[f"{self.split}/x"].shape[1:])

    def column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """`id` (as str objects), `y` (uint8) or `fold` (int8) of rows [start, stop) (default: whole)."""
        values = np.asarray(self._group()[f"{self.split}/{name}"][start:stop])
        if name == "id":
            return np.array([i.decode() if isinstance(i, bytes) else str(i) for i in values], dtype=object)
        return values.astype(np.uint8) if name == "y" else values

    def range(self, start: int, stop: int) -> np.ndarray:
        """Images of rows [start, stop).

        Unmapped, the Zarr layout `build` writes is read with pread (stats reads every row in
        runs: zarr's per-inner-chunk pipeline halved its rate); other layouts through zarr.
        """
        if self._mapped():
            rows = np.arange(start, min(stop, len(self)))
            return self.take(rows, np.empty((len(rows), *self.shape), np.uint8))
        if self.kind == "zarr" and self._shards is None:
            self._shards = ZarrShards.open(self.path / self.split / "x") or False
        if self._shards:
            return self._shards.read(start, stop, self._checked)
        with self._library_errors():
            return np.asarray(self._group()[f"{self.split}/x"][start:stop])

    def take(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Images of store rows `rows` (any order, repeats allowed) into `out`."""
        if self._mapped():
            blocks, per = self._chunks
            return gather(blocks, rows // per, rows % per, out)
        x = self._group()[f"{self.split}/x"]
        unique, inverse = np.unique(rows, return_inverse=True)  # both libraries want increasing, distinct rows
        with self._library_errors():
            if len(unique) and unique[-1] - unique[0] + 1 == len(unique):  # a run of rows (verify): a slice is
                picked = x[int(unique[0]) : int(unique[-1]) + 1]  # ~8x faster than zarr's integer selection
            else:
                picked = x.get_orthogonal_selection((unique,)) if self.kind == "zarr" else x[unique]
        return np.take(picked, inverse, axis=0, out=out, mode="clip")  # clip: rows are valid, and out unbuffered

    @contextmanager
    def _library_errors(self) -> Iterator[None]:
        """zarr reports a shard index that fails its crc32c as a bare ValueError: name the store instead."""
        try:
            yield
        except ValueError as exc:
            if self.kind != "zarr" or "checksum" not in str(exc):
                raise
            raise ShardError(f"{self.path}: zarr cannot read {self.split}/x ({exc}); rebuild it") from None

    def _mapped(self) -> bool:
        """Whether rows come from mapped chunks (HDF5) or shards (Zarr), mapping them on first use."""
        group = self._group()  # first: after a fork it drops the parent's handle and mappings
        if self.mapped and self._chunks is None:
            if self.kind == "hdf5":
                self._chunks = mapped_hdf5_chunks(group[f"{self.split}/x"]) or False
            else:
                shards = ZarrShards.open(self.path / self.split / "x")
                self._chunks = (shards.mapped(), shards.per[0]) if shards else False
        return bool(self._chunks)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = state["_chunks"] = None  # never send an open handle or a mapping anywhere
        return state
