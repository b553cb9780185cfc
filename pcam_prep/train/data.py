"""The torch side of loading: uint8 batches to the device, and the float work done there.

Three ways to feed a step, all yielding `DeviceBatch`es in the same order for a (seed, epoch):

* in-process (the default): a background thread gathers each batch from the memory-mapped
  shards (one fancy-index copy), pins it on CUDA and starts a non_blocking copy on a side
  stream, 1-2 batches ahead of the step;
* DataLoader workers (`ShardStream`): worker w of W takes `loader.plan(w, W)`; DataLoader
  visits workers round-robin, which restores the plan's order;
* resident (`ResidentSplit`): the whole uint8 split lives on the device and a batch is an
  index_select there, so the loop does no loader work at all.

Normalisation (uint8 -> float, /255, stain normalisation if fitted, (x - mean) / std, NHWC -> NCHW)
happens on the device; the permuted NHWC bytes already are the channels_last layout, so no copy
is needed to get it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import PcamPrepError
from ..loader import BatchLoader, Source, open_source
from ..manifest import read_manifest
from ..memory import M_MMAP_MAX, M_TRIM_THRESHOLD, tune_malloc
from .stain import StainNormaliser

logger = logging.getLogger(__name__)

HostBatch = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor]  # images uint8 NHWC, labels uint8, index int64


@dataclass(frozen=True)
class DeviceBatch:
    images: torch.Tensor  # (B, H, W, 3) uint8 on the device
    labels: torch.Tensor | None  # (B,) float32 on the device; None for the test split
    index: np.ndarray  # (B,) rows within the source, on the host


class Normalise:
    """uint8 NHWC -> float NCHW (channels_last) on 0-1 scale (stain-normalised, if fitted), then (x - mean) / std."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device,
                 stain: dict[str, Any] | None = None) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need 3 channel means and 3 positive stds, got mean={mean!r} std={std!r}")
        # as saved in checkpoints: `predict` rebuilds the same transform from them
        self.stats = {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "stain": stain}
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.stain = None if stain is None else StainNormaliser(stain, device)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], device: torch.device) -> Normalise:
        """The normalisation a checkpoint was trained with (checkpoints from before --stain-norm have none)."""
        return cls(ckpt["mean"], ckpt["std"], device, ckpt.get("stain"))

    @staticmethod
    def to_unit(images: torch.Tensor) -> torch.Tensor:
        return images.permute(0, 3, 1, 2).float().div_(255)

    def unit(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> 0-1 NCHW, stain-normalised onto the fitted reference when there is one."""
        x = self.to_unit(images)
        return x if self.stain is None else self.stain(x)

    def __call__(self, unit: torch.Tensor) -> torch.Tensor:
        return ((unit - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' -> this process's GPU (LOCAL_RANK under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PcamPrepError("--device cuda: this torch build or machine has no CUDA GPU (use --device cpu)")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise PcamPrepError(f"device must be auto, cpu or cuda; got {name!r}")
    return torch.device("cpu")


def fold_sources(shards: Path, val_fold: int, fmt: str, world: int = 1) -> tuple[Source, Source]:
    """(train, validation) rows of a built folder: fold `val_fold` validates, every other fold trains."""
    k = read_manifest(shards)["folds"]["k"]
    if k < 2:
        raise PcamPrepError(f"{shards} was built with --folds {k}: training holds one fold out for validation, "
                            "so it needs at least 2; rebuild with --folds 5")
    if not 0 <= val_fold < k:
        raise PcamPrepError(f"--val-fold {val_fold} does not exist: {shards} has folds 0..{k - 1}")
    train = open_source(shards, "train", [f for f in range(k) if f != val_fold], fmt)
    val = open_source(shards, "train", [val_fold], fmt)
    if len(train) < world or not len(val):
        raise PcamPrepError(f"too few images: {len(train)} to train on {world} process(es), {len(val)} to validate")
    return train, val


def keep_freed_memory_on_cpu() -> None:
    """Make glibc reuse freed blocks of any size instead of unmapping them (CPU training and predicting).

    A CPU step allocates and frees the same few hundred MB of activations each time; glibc
    serves blocks above 32 MB with fresh mmaps, and faulting their pages in (~9 us a page on
    these VMs) took ~5 s of a ~6 s step at batch 256. With no mmapped chunks and a high trim
    threshold the freed memory stays in the heap and is reused: ~1.7x faster steps measured.
    """
    tune_malloc({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 4 * 1024**3})


def host_batch(loader: BatchLoader, index: np.ndarray, pin: bool) -> HostBatch:
    """A batch as host tensors; with `pin`, gathered straight into pinned memory (no extra copy)."""
    images = torch.empty((len(index), *loader.source.shape), dtype=torch.uint8, pin_memory=pin)
    batch = loader.batch(index, out=images.numpy())
    labels = None if batch.labels is None else torch.from_numpy(batch.labels)
    if pin and labels is not None:
        labels = labels.pin_memory()
    return images, labels, torch.from_numpy(np.asarray(index, dtype=np.int64))


class ShardStream(IterableDataset):
    """One epoch of a BatchLoader for DataLoader workers (use batch_size=None): worker w of W takes plan(w, W)."""

    def __init__(self, loader: BatchLoader, steps: int | None = None) -> None:
        self.loader, self.steps = loader, steps

    def __iter__(self) -> Iterator[HostBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in self.loader.plan(worker, workers, pad_to=self.steps):
            yield host_batch(self.loader, index, pin=False)  # DataLoader(pin_memory=True) pins in the parent


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Produce `items` on a background thread, up to `depth` ahead; errors re-raise here."""
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(("error", exc))

    thread = threading.Thread(target=work, name="pcam-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _start_copy(host: HostBatch, device: torch.device, stream: Any) -> tuple[DeviceBatch, Any]:
    images, labels, index = host
    if device.type != "cuda":
        return DeviceBatch(images, None if labels is None else labels.float(), index.numpy()), None
    # torch.cuda.device too: on this (prefetch) thread the current device is 0, and leaving a bare
    # stream context would switch to it, opening a CUDA context on GPU 0 in every DDP rank
    with torch.cuda.device(device), torch.cuda.stream(stream):
        images = images.to(device, non_blocking=True)
        labels = None if labels is None else labels.to(device, non_blocking=True).float()
        done = torch.cuda.Event()
        done.record(stream)
    return DeviceBatch(images, labels, index.numpy()), done


def _finish_copy(batch: DeviceBatch, done: Any) -> DeviceBatch:
    if done is not None:  # the step's stream waits for the side-stream copy, and keeps its memory alive
        current = torch.cuda.current_stream(batch.images.device)
        current.wait_event(done)
        for tensor in (batch.images, batch.labels):
            if tensor is not None:
                tensor.record_stream(current)
    return batch


def stream_batches(loader: BatchLoader, device: torch.device, *, steps: int | None = None, workers: int = 0,
                   depth: int = 2) -> Iterator[DeviceBatch]:
    """One epoch of `loader` as DeviceBatches, gathered `depth` batches ahead of the consumer."""
    cuda = device.type == "cuda"
    if workers:
        hosts: Iterable[HostBatch] = DataLoader(ShardStream(loader, steps), batch_size=None, num_workers=workers,
                                                pin_memory=cuda, prefetch_factor=depth)
    else:
        hosts = (host_batch(loader, index, pin=cuda) for index in loader.plan(pad_to=steps))
    stream = torch.cuda.Stream(device) if cuda else None
    for batch, done in prefetch((_start_copy(h, device, stream) for h in hosts), depth):
        yield _finish_copy(batch, done)


class ResidentSplit:
    """A whole split as one uint8 tensor on the device; a batch is an index_select there."""

    def __init__(self, source: Source, device: torch.device, chunk: int = 4096) -> None:
        n, cuda = len(source), device.type == "cuda"
        if not n:
            raise ValueError("cannot keep an empty split resident")
        shape = source.shape
        self.images = torch.empty((n, *shape), dtype=torch.uint8, device=device)
        staging = torch.empty((min(n, chunk), *shape), dtype=torch.uint8, pin_memory=True) if cuda else None
        for start in range(0, n, chunk):
            rows = np.arange(start, min(n, start + chunk))
            if staging is None:  # CPU: gather straight into the resident tensor
                source.take(rows, out=self.images[start : start + len(rows)].numpy())
                continue
            part = staging[: len(rows)]
            torch.cuda.current_stream(device).synchronize()  # the previous copy out of `staging` is done
            source.take(rows, out=part.numpy())
            self.images[start : start + len(rows)].copy_(part, non_blocking=True)
        if cuda:
            torch.cuda.current_stream(device).synchronize()
        self.labels = None if source.labels is None else torch.from_numpy(source.labels).to(device).float()
        logger.info("resident: %d images (%.2f GB) on %s", n, self.images.nbytes / 1e9, device)

    def batches(self, plan: list[np.ndarray]) -> Iterator[DeviceBatch]:
        """The plan's batches, with the whole epoch's index sent to the device once."""
        if not plan:
            return
        order = torch.from_numpy(np.concatenate(plan).astype(np.int64)).to(self.images.device)
        start = 0
        for index in plan:
            rows = order[start : start + len(index)]
            start += len(index)
            labels = None if self.labels is None else self.labels.index_select(0, rows)
            yield DeviceBatch(self.images.index_select(0, rows), labels, index)


def resident_fits(nbytes: int, device: torch.device, copies: int = 1) -> bool:
    """Whether `nbytes` fit comfortably: half the free GPU memory, or a quarter of the available RAM.

    `copies`: processes on this host that each keep their own copy (CPU ranks under torchrun).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes < free // 2
    import psutil

    return nbytes * copies < psutil.virtual_memory().available // 4


def loader_throughput(loader: BatchLoader, seconds: float) -> dict[str, float]:
    """Iterate shuffled epochs of `loader` (uint8 batches only) for about `seconds`; images per second."""
    images, epoch, start = 0, loader.epoch, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loader.set_epoch(epoch)
        for batch in loader:
            images += len(batch.index)
            if time.perf_counter() - start >= seconds:
                break
        epoch += 1
    elapsed = time.perf_counter() - start
    return {"images": images, "seconds": round(elapsed, 3), "images_per_s": round(images / elapsed, 1)}
