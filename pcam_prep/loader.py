"""Shards -> shuffled uint8 batches, with no per-sample decoding and nothing unpickled.

A WebDataset shard written by `build` has a fixed byte layout (schema.SampleLayout), so it is
opened as a memory map, every tar header is checked once against the layout (names, sizes,
the exact npy header: no pickle, no surprise members), and the pixels become one strided
(N, H, W, 3) uint8 view. A batch is then a single fancy-index gather.

Zarr and HDF5 stores are read through the same interface (`open_source`). Order is a pure
function of (seed, epoch); ranks and DataLoader workers take disjoint slices of it, and a
loader can start mid-epoch at any step.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import PcamPrepError
from .schema import (
    HDF5_NAME,
    IMAGE_MEMBER,
    LABEL_MEMBER,
    TAR_BLOCK,
    ZARR_NAME,
    SampleLayout,
    SplitSpec,
)
from .writers.manifest import read_manifest, safe_relpath

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # (B, H, W, 3) uint8
    labels: np.ndarray | None  # (B,) uint8
    ids: list[str]
    index: np.ndarray  # (B,) row numbers within the source


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


def pixels_view(data: np.ndarray, layout: SampleLayout, count: int) -> np.ndarray:
    """The pixels of `count` consecutive samples in `data` as a strided (count, H, W, 3) view."""
    h, w, c = layout.shape
    return np.lib.stride_tricks.as_strided(
        data[layout.pixel_offset :], shape=(count, h, w, c), strides=(layout.stride, w * c, c, 1), writeable=False
    )


class ShardReader:
    """One shard as memory-mapped arrays, after checking every member against the layout."""

    def __init__(self, path: Path, layout: SampleLayout, count: int) -> None:
        self.path, self.layout, self.count = Path(path), layout, count
        self._data: np.ndarray | None = None
        self.ids, self.labels = self._check()

    def _check(self) -> tuple[list[str], np.ndarray | None]:
        data = self.data
        stride, n = self.layout.stride, self.count
        if data.size < n * stride + 2 * TAR_BLOCK:
            raise ShardError(f"{self.path}: {data.size} bytes cannot hold {n} samples of {stride} bytes")
        if data[n * stride : n * stride + 2 * TAR_BLOCK].any():
            raise ShardError(f"{self.path}: unexpected member after sample {n} (shard holds more than the manifest says)")
        records = data[: n * stride].reshape(n, stride)
        image_names = _names(records[:, :TAR_BLOCK])
        ids = [name[: -len(IMAGE_MEMBER) - 1] for name in image_names]
        self._expect(image_names, [f"{i}.{IMAGE_MEMBER}" for i in ids], records[:, :TAR_BLOCK],
                     self.layout.image_member_size)
        header = np.frombuffer(self.layout.npy_header, np.uint8)
        bad = np.flatnonzero((records[:, TAR_BLOCK : self.layout.pixel_offset] != header).any(axis=1))
        if bad.size:
            raise ShardError(f"{self.path}: sample {ids[bad[0]]!r} .npy header is not a plain {self.layout.shape} uint8 "
                             "array (pickled or foreign members are refused)")
        labels = None
        if self.layout.labelled:
            at = self.layout.label_offset
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
        if (headers[:, 156] != ord("0")).any() or list(_sizes(headers)) != [size]:
            raise ShardError(f"{self.path}: a member has the wrong type or size (expected regular files of {size} bytes)")

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = _open_map(self.path)
        return self._data

    @property
    def images(self) -> np.ndarray:
        return pixels_view(self.data, self.layout, self.count)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_data"] = None  # never pickle a mapping: reopen in the worker
        return state


class Source:
    """Rows of one split (optionally some folds) with `take(index) -> images`."""

    ids: np.ndarray
    labels: np.ndarray | None
    shape: tuple[int, ...]  # of one image: (H, W, 3)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images of rows `index`, in that order, as (len(index), H, W, 3) uint8; written into `out` if given.

        `out` lets a caller gather straight into memory it owns (e.g. pinned for a GPU copy).
        """
        raise NotImplementedError

    def _out(self, index: np.ndarray, out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        """Check `index` against this source's rows (no negative wrap-around) and give the output array."""
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows: {index.min()}..{index.max()}")
        wanted = (len(index), *shape)
        if out is None:
            return np.empty(wanted, np.uint8)
        if out.shape != wanted or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous uint8 array of shape {wanted}, got {out.dtype} {out.shape}")
        return out


class WdsSource(Source):
    def __init__(self, out: Path, manifest: dict, split: str, folds: Sequence[int] | None) -> None:
        shape = tuple(manifest["image_shape"])
        spec = split_spec(manifest, split)
        layout = SampleLayout(shape, spec.labelled)
        entries = [f for f in manifest["files"] if f["format"] == "wds" and f["split"] == split
                   and (folds is None or not spec.folded or f["fold"] in folds)]
        self.shards = [ShardReader(safe_relpath(out, f["path"]), layout, f["count"]) for f in entries]
        self.starts = np.cumsum([0] + [s.count for s in self.shards])
        self.ids = np.array([i for s in self.shards for i in s.ids], dtype=object)
        self.labels = np.concatenate([s.labels for s in self.shards]) if layout.labelled and self.shards else None
        self.shape = shape
        self._views: list[np.ndarray] | None = None

    def take(self, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        # One memcpy per image, straight from the mapped shard into `out`. Vectorised
        # alternatives copy twice (per-shard fancy gather, then scatter into place) and
        # measured ~1.8x slower; np.take(out=) on the strided views is ~100x slower still.
        index = np.asarray(index)
        out = self._out(index, out, self.shape)
        if self._views is None:
            self._views = [shard.images for shard in self.shards]
        shard_of = np.searchsorted(self.starts, index, side="right") - 1
        return gather(self._views, shard_of, index - self.starts[shard_of], out)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_views": None}  # views hold mappings: the shards reopen theirs


def gather(blocks: list[np.ndarray], block_of: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[k] = blocks[block_of[k]][rows[k]]: one memcpy per image, straight into `out`."""
    for k, (block, row) in enumerate(zip(block_of.tolist(), rows.tolist())):
        out[k] = blocks[block][row]
    return out


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


class ArraySource(Source):
    """Zarr or HDF5: `{split}/x` rows, filtered by `{split}/fold` when folds are given."""

    def __init__(self, path: Path, kind: str, split: str, folds: Sequence[int] | None,
                 spec: SplitSpec | None = None, mapped: bool = True) -> None:
        self.path, self.kind, self.split = Path(path), kind, split
        spec = spec or SplitSpec(split, split == "train", split == "train")
        self._handle, self._pid = None, os.getpid()
        self.mapped = mapped and kind == "hdf5"  # False: read through h5py, as other readers do (verify)
        self._chunks: tuple[list[np.ndarray], int] | bool | None = None  # mapped HDF5 chunks; False: not mappable
        group = self._group()
        ids = np.asarray(group[f"{split}/id"][:])
        ids = np.array([i.decode() if isinstance(i, bytes) else str(i) for i in ids], dtype=object)
        labels = np.asarray(group[f"{split}/y"][:], np.uint8) if spec.labelled else None
        rows = np.arange(len(ids))
        if folds is not None and spec.folded:
            rows = np.flatnonzero(np.isin(np.asarray(group[f"{split}/fold"][:]), list(folds)))
        self.rows, self.ids = rows, ids[rows]
        self.labels = None if labels is None else labels[rows]
        self.shape = tuple(group[f"{split}/x"].shape[1:])

    def _group(self):
        if self._handle is not None and self._pid != os.getpid():  # a forked DataLoader worker: own handle
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

    def take(self, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        index = np.asarray(index)
        out = self._out(index, out, self.shape)
        rows = self.rows[index]
        x = self._group()[f"{self.split}/x"]
        if self.mapped and self._chunks is None:
            self._chunks = mapped_hdf5_chunks(x) or False
        if self._chunks:
            blocks, per = self._chunks
            return gather(blocks, rows // per, rows % per, out)
        unique, inverse = np.unique(rows, return_inverse=True)  # both libraries want increasing, distinct rows
        picked = x.get_orthogonal_selection((unique,)) if self.kind == "zarr" else x[unique]
        return np.take(picked, inverse, axis=0, out=out, mode="clip")  # clip: rows are valid, and out unbuffered

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = state["_chunks"] = None  # never send an open handle or a mapping anywhere
        return state


FORMATS = {"wds": None, "zarr": ZARR_NAME, "hdf5": HDF5_NAME}


def open_source(out: Path, split: str = "train", folds: Sequence[int] | None = None, fmt: str = "wds",
                mapped: bool = True) -> Source:
    """Open a built OUT folder's `split` (train: optionally only `folds`) in format `fmt`.

    Splits are those the manifest lists (Kaggle: train, test; PCam: train, valid, test); a
    split's `labels` are None when the manifest says it is unlabelled. `mapped=False` reads
    HDF5 through h5py even where its unfiltered chunks could be memory-mapped.
    """
    out = Path(out)
    manifest = read_manifest(out)
    if split not in manifest["splits"]:
        raise PcamPrepError(f"split must be one of {', '.join(manifest['splits'])}, got {split!r}")
    if folds is not None:
        bad = sorted(set(folds) - set(range(manifest["folds"]["k"])))
        if bad:
            raise PcamPrepError(f"fold(s) {bad} do not exist; this build has folds 0..{manifest['folds']['k'] - 1}")
    built = {f["format"] for f in manifest["files"]}
    if fmt not in FORMATS:
        raise PcamPrepError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt not in built:
        raise PcamPrepError(f"{out} has no {fmt} output (built: {', '.join(sorted(built - {'csv'}))})")
    if fmt == "wds":
        return WdsSource(out, manifest, split, folds)
    return ArraySource(out / FORMATS[fmt], fmt, split, folds, split_spec(manifest, split), mapped)


def split_spec(manifest: dict, split: str) -> SplitSpec:
    """A split's flags as the manifest records them (manifests before PCam support: train only is labelled)."""
    entry = manifest["splits"][split]
    return SplitSpec(split, entry.get("labelled", split == "train"), entry.get("folded", split == "train"))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The sample order of one epoch: a pure function of (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_plan(n: int, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
               rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1,
               drop_last: bool = False) -> list[np.ndarray]:
    """Index batches for one (rank, worker): disjoint across both, every sample once per epoch.

    Ranks take interleaved samples of the epoch order (sizes differ by at most one); each
    rank's batches are dealt round-robin to its DataLoader workers.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    mine = epoch_order(n, seed, epoch, shuffle)[rank::world_size]
    stop = len(mine) - len(mine) % batch_size if drop_last else len(mine)
    batches = [mine[i : i + batch_size] for i in range(0, stop, batch_size)]
    return batches[worker::num_workers]


class BatchLoader:
    """Iterate uint8 batches of a Source for one epoch; `set_epoch` moves to the next one.

    `start_step` skips the first batches of the epoch (resume mid-epoch). Length and order
    depend only on (seed, epoch, rank, world_size, batch_size).
    """

    def __init__(self, source: Source, batch_size: int = 256, *, shuffle: bool = True, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 start_step: int = 0) -> None:
        self.source, self.batch_size, self.shuffle, self.seed = source, batch_size, shuffle, seed
        self.epoch, self.rank, self.world_size, self.drop_last = epoch, rank, world_size, drop_last
        self.start_step = start_step

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def plan(self, worker: int = 0, num_workers: int = 1, pad_to: int | None = None) -> list[np.ndarray]:
        """This rank's batches from `start_step` on, dealt round-robin to DataLoader workers.

        `pad_to` first pads the whole epoch to that many batches by repeating its first sample
        as a batch of one (as torch's DistributedSampler pads): under DDP every rank must run
        the same number of steps, and a rank can hold one sample, so one batch, fewer than rank 0.
        """
        batches = batch_plan(len(self.source), self.batch_size, seed=self.seed, epoch=self.epoch,
                             shuffle=self.shuffle, rank=self.rank, world_size=self.world_size,
                             drop_last=self.drop_last)
        if pad_to is not None:
            if len(batches) > pad_to or (pad_to and not batches):
                raise ValueError(f"this rank has {len(batches)} batches; cannot make {pad_to} from them")
            batches += [batches[0][:1]] * (pad_to - len(batches))
        return batches[self.start_step :][worker::num_workers]

    def __len__(self) -> int:
        return len(self.plan())

    def batch(self, index: np.ndarray, out: np.ndarray | None = None) -> Batch:
        """The batch of rows `index`; images are gathered into `out` when given (see Source.take)."""
        labels = None if self.source.labels is None else self.source.labels[index]
        return Batch(self.source.take(index, out), labels, list(self.source.ids[index]), index)

    def __iter__(self) -> Iterator[Batch]:
        for index in self.plan():
            yield self.batch(index)

    def tensors(self) -> Iterator[tuple]:
        """The same epoch as torch tensors: (images (B,H,W,3) uint8, labels (B,) uint8 or None, ids).

        Zero-copy views of each batch; torch is imported only here, so the module stays numpy-only.
        """
        import torch

        for batch in self:
            labels = None if batch.labels is None else torch.from_numpy(batch.labels)
            yield torch.from_numpy(batch.images), labels, batch.ids
