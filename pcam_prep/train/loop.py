"""Training: `train(config)` reads top to bottom, like nanoGPT's train.py.

setup (device, DDP, data, model, optimiser, resume) -> per epoch: train steps, validate,
record, checkpoint, plot -> stop early on patience. The same code runs as one process or
under `torchrun`: each rank reads its own interleaved slice of every epoch, gradients are
averaged by DistributedDataParallel, validation predictions are gathered so the AUC covers
the whole fold, and only rank 0 writes files and reports progress.

Augmentation and dropout are reseeded every step from (seed, rank, epoch, step), like the
batch order, so a resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from ..errors import PcamPrepError
from ..files import tmp_path, write_json_atomic
from ..loader import BatchLoader
from ..manifest import manifest_digest, read_manifest
from ..memory import release_freed_memory
from .augment import augment
from .backbones import build_network, freeze_norms, frozen_at, load_init, param_groups, set_frozen
from .config import TrainConfig, jsonable
from .data import (
    DeviceBatch,
    Normalise,
    ResidentSplit,
    fold_sources,
    keep_freed_memory_on_cpu,
    resident_fits,
    resolve_device,
    stream_batches,
)
from .metrics import accuracy, bce_with_logits, roc_auc, sigmoid
from .models import DEFAULT_WIDTHS
from .plots import plot_confusion, plot_curves, plot_roc
from .predict import write_predictions
from .stain import fit_stain_reference, hed_jitter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """One report to the progress callback (rank 0 only)."""

    epoch: int  # 0-based epoch in progress
    step: int  # steps of the epoch done
    steps: int  # steps in the epoch
    images: int  # images trained this epoch, over all ranks (approximate under DDP)
    loss: float | None  # running mean train loss of the epoch, when it was read back this step (a GPU sync)
    record: dict[str, Any] | None = None  # the finished epoch's metrics, on its last report
    total: int = 0  # images in the epoch, over all ranks: the progress bar's total


@dataclass
class RunState:
    """What a checkpoint restores besides weights and optimiser: where the run is and how it went."""

    epoch: int = 0  # epoch in progress, or the next to start
    step: int = 0  # steps of `epoch` already done
    loss_sum: float = 0.0  # train loss x images so far in `epoch`
    seen: int = 0  # train images so far in `epoch`
    best_auc: float = -1.0
    best_epoch: int | None = None  # epochs are counted from 1 in records: epoch 1 is the first
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

    config: TrainConfig  # resolved: device, width and resident filled in
    rank: int
    world: int
    device: torch.device
    model: nn.Module  # the plain model: saved and evaluated
    net: nn.Module  # what trains: the model, maybe compiled, maybe wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: BatchLoader  # this rank's train batches
    val_loader: BatchLoader  # this rank's share of the validation fold, unshuffled
    resident: ResidentSplit | None  # the train split on the device, or None to stream it
    norm: Normalise  # the manifest's mean/std (and the stain reference), applied on the device
    steps: int  # per epoch, the same on every rank
    state: RunState
    pending_loss: torch.Tensor  # train loss x images not yet added to state.loss_sum (on the device)
    build_sha256: str = ""  # sha256 of the manifest this run loaded: recorded in every checkpoint


def train(config: TrainConfig, progress: Callable[[Progress], None] | None = None) -> dict[str, Any]:
    """Train as `config` says; returns the metrics also written to OUT/metrics.json."""
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1),
                                                                        ("LOCAL_RANK", 0)))
    device = resolve_device(config.device, local_rank)
    if device.type == "cpu":
        keep_freed_memory_on_cpu()
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank == 0:
        check_run_folder(config)
    run = None
    try:
        with deferred_interrupt() as interrupted:
            run = setup(config, rank, world, device)
            report = progress if rank == 0 else None
            for epoch in range(run.state.epoch, config.epochs):
                run_epoch(run, epoch, report, interrupted)
                if interrupted.is_set():
                    raise KeyboardInterrupt
                if config.patience and epoch + 1 - run.state.best_epoch >= config.patience:
                    logger.info("no better val AUC for %d epochs: stopping after epoch %d", config.patience, epoch)
                    break
            return metrics(run)
    except KeyboardInterrupt:
        if run is not None and rank == 0:
            save_last(run)  # `--resume` continues from this very step
            where = (f"epoch {run.state.epoch + 1}/{config.epochs}, step {run.state.step} of {run.steps}"
                     if run.state.step else f"after epoch {run.state.epoch}/{config.epochs}")
            raise KeyboardInterrupt(f"interrupted: saved {config.out / 'last.pt'} ({where}); rerun the same "
                                    "command with --resume to continue") from None
        raise
    finally:
        if world > 1:
            torch_dist.destroy_process_group()


RUN_FILES = ("last.pt", "best.pt", "metrics.json")


def check_run_folder(config: TrainConfig) -> None:
    """Never train over an earlier run by accident: continue it (--resume) or replace it (--overwrite)."""
    found = [name for name in RUN_FILES if (config.out / name).exists()]
    if found and not (config.resume or config.overwrite):
        raise PcamPrepError(f"{config.out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                            "--overwrite to replace it, or choose another --out")


@contextlib.contextmanager
def deferred_interrupt():
    """Turn the first Ctrl-C into a flag the loop checks between steps; a second one stops at once.

    A KeyboardInterrupt raised mid-step could land between optimizer.step() and the step
    counter, and `--resume` would then apply that update twice.
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield flag
        return

    def handle(signum, frame) -> None:
        flag.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logger.warning("interrupted: finishing this step, then saving last.pt (Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def setup(config: TrainConfig, rank: int, world: int, device: torch.device) -> Run:
    train_source, val_source = fold_sources(config.shards, config.val_fold, config.format, world)
    manifest = read_manifest(config.shards)
    nbytes = len(train_source) * int(np.prod(manifest["image_shape"]))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # each CPU rank on this host holds its own copy
    resident = config.resident if config.resident is not None else (
        not config.workers and resident_fits(nbytes, device, copies=local_ranks))
    config = dataclasses.replace(config, device=device.type, width=config.width or DEFAULT_WIDTHS.get(config.arch),
                                 resident=resident)  # resolved: saved with metrics and checkpoints
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_network(config.arch, config.width, config.input_size, config.pretrained and not config.resume)
    if config.init is not None and not config.resume:
        load_init(model, config.init)  # before the move: the file's tensors are on the CPU
    model = model.to(device, memory_format=torch.channels_last)
    steps = len(BatchLoader(train_source, config.batch_size, rank=0, world_size=world))  # rank 0 has the most
    optimizer, scheduler = make_optimizer(model, config, steps * config.epochs)
    state = restore(config, model, optimizer, scheduler, device, world) if config.resume else RunState()
    stats = manifest["stats"]
    stain = fit_stain_reference(config.stain_norm, config.stain_ref, config.shards, config.format, train_source,
                                config.seed)
    return Run(
        config, rank, world, device, model, wrap(model, config, world, device), optimizer, scheduler,
        BatchLoader(train_source, config.batch_size, seed=config.seed, rank=rank, world_size=world),
        # validation at the training batch size: its blocks fit the holes training leaves in the heap
        BatchLoader(val_source, config.batch_size, shuffle=False, rank=rank, world_size=world),
        ResidentSplit(train_source, device) if resident else None, Normalise(stats["mean"], stats["std"], device, stain),
        steps, state, torch.zeros((), device=device), manifest_digest(config.shards))


def make_optimizer(model: nn.Module, config: TrainConfig, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW or SGD (no weight decay on biases and norm scales) with a per-step warmup + cosine schedule.

    Backbone and head are separate groups (`lr_backbone`); frozen parameters get no gradient,
    so the optimiser skips them until they are unfrozen.
    """
    groups = param_groups(model, config)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=config.device == "cuda")
    schedule = functools.partial(lr_factor, total=total_steps, warmup=config.warmup)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Share of the peak learning rate at `step`: linear warmup over `warmup` of `total`, then cosine to 0."""
    ramp = max(1, round(warmup * total))
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - ramp) / max(1, total - ramp))))


def wrap(model: nn.Module, config: TrainConfig, world: int, device: torch.device) -> nn.Module:
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if config.compile else net


def run_epoch(run: Run, epoch: int, progress: Callable[[Progress], None] | None,
              interrupted: threading.Event | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    trained = train_epoch(run, epoch, progress, interrupted)
    index, logits = evaluate(run)
    if run.device.type == "cpu":
        # CPU malloc keeps freed blocks for reuse (keep_freed_memory_on_cpu); after the epoch's two
        # phases its heap is fragmented and the next step would map ~1-2 GB more. Trimming here,
        # once an epoch, kept peak RSS at one training step's working set (README: training memory).
        release_freed_memory()
    labels, probs = run.val_loader.source.labels[index], sigmoid(logits)
    record = {"epoch": epoch + 1, "train_loss": trained["loss"], "val_loss": bce_with_logits(labels, logits),
              "val_auc": roc_auc(labels, probs), "val_acc": accuracy(labels, probs),
              "images_per_s": trained["images_per_s"], "data_wait_frac": trained["data_wait_frac"],
              "seconds": round(time.perf_counter() - start, 3)}
    state = run.state
    # NaN (a fold with one class) never counts as best, and never blocks a real AUC from being best
    improved = state.best_epoch is None or math.isnan(state.best_auc) or record["val_auc"] > state.best_auc
    if improved:
        state.best_auc, state.best_epoch = record["val_auc"], epoch + 1
    state.history = [r for r in state.history if r["epoch"] <= epoch] + [record]
    state.epoch, state.step, state.loss_sum, state.seen = epoch + 1, 0, 0.0, 0
    if run.rank == 0:
        write_epoch(run, record, improved, run.val_loader.source.ids[index], labels, probs)
    if progress is not None:
        progress(Progress(epoch, run.steps, run.steps, trained["images"], record["train_loss"], record,
                          total=len(run.loader.source)))
    logger.info("epoch %d: %s", epoch, record)
    return record


def train_epoch(run: Run, epoch: int, progress: Callable[[Progress], None] | None,
                interrupted: threading.Event | None = None) -> dict[str, float]:
    """The rest of `epoch` from run.state.step; loss, throughput and the share of time spent waiting for data.

    Waiting is wall time blocked on the next batch. On CUDA the loop reads the loss back every
    log_every steps and at the end, so the host never runs far ahead of the GPU: time blocked
    on data is time the GPU runs dry, and the epoch's wall time includes all of its GPU work.
    """
    state, config = run.state, run.config
    run.loader.set_epoch(epoch, start_step=state.step)
    if set_frozen(run.model, frozen_at(config, epoch)) and (run.world > 1 or config.compile):
        run.net = wrap(run.model, config, run.world, run.device)  # DDP and compile fix the trainable set
    run.net.train()
    freeze_norms(run.model)
    images, wait, start = 0, 0.0, time.perf_counter()
    total = len(run.loader.source)
    if progress is not None:  # the bar shows from the first second, before the first batch arrives
        progress(Progress(epoch, state.step, run.steps, state.seen * run.world, None, total=total))
    with contextlib.closing(epoch_batches(run)) as batches:
        for step in range(state.step, run.steps):
            if interrupted is not None and interrupted.is_set():
                raise KeyboardInterrupt  # between steps: last.pt then resumes exactly here
            waited = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - waited
            run.pending_loss += train_step(run, batch, epoch, step) * len(batch.index)
            images, state.seen, state.step = images + len(batch.index), state.seen + len(batch.index), step + 1
            loss = None
            if state.step % config.log_every == 0 or state.step == run.steps:
                flush_loss(run)  # reading the loss back syncs the GPU: only every log_every steps
                loss = state.loss_sum / max(1, state.seen)
            if progress is not None:  # every step: the image count needs no sync
                progress(Progress(epoch, state.step, run.steps, min(total, state.seen * run.world), loss,
                                  total=total))
            if state.step % config.checkpoint_every == 0 and run.rank == 0:
                save_last(run)
    flush_loss(run)
    seconds = time.perf_counter() - start
    loss_sum, seen = all_sum(run, [state.loss_sum, float(state.seen)])
    return {"loss": loss_sum / max(1.0, seen), "images": int(seen),
            "images_per_s": round(images * run.world / max(seconds, 1e-9), 1),
            "data_wait_frac": round(wait / max(seconds, 1e-9), 4)}


def epoch_batches(run: Run):
    """The epoch's batches from run.state.step on (the loader already starts there), padded to run.steps."""
    if run.resident is not None:
        return run.resident.batches(run.loader.plan(pad_to=run.steps))
    return stream_batches(run.loader, run.device, steps=run.steps, workers=run.config.workers)


def train_step(run: Run, batch: DeviceBatch, epoch: int, step: int) -> torch.Tensor:
    generator = reseed(run, epoch, step)
    x = run.norm.unit(batch.images)
    if run.config.stain_augment == "hed":
        x = hed_jitter(x, generator, run.config.stain_sigma)
    x = run.norm(augment(x, generator) if run.config.augment else x)
    with autocast(run):
        logits = run.net(x)
    loss = F.binary_cross_entropy_with_logits(logits.float(), batch.labels)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    return loss.detach()


def reseed(run: Run, epoch: int, step: int) -> torch.Generator:
    """Dropout and augmentation randomness for this step, a pure function of (seed, rank, epoch, step)."""
    seed = int(np.random.SeedSequence([run.config.seed, run.rank, epoch, step]).generate_state(1)[0])
    torch.manual_seed(seed)
    return torch.Generator(run.device).manual_seed(seed)


def autocast(run: Run):
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.config.amp and run.device.type == "cuda")


@torch.no_grad()
def evaluate(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(rows, logits) of the whole validation fold, gathered from every rank, in fold order."""
    run.model.eval()
    if run.world > 1:  # BN statistics drift apart per rank; evaluate everywhere with rank 0's
        for buffer in run.model.buffers():
            torch_dist.broadcast(buffer, 0)
    index, logits = [], []
    for batch in stream_batches(run.val_loader, run.device):
        with autocast(run):
            logits.append(run.model(run.norm(run.norm.unit(batch.images))).float())
        index.append(batch.index)
    mine = (np.concatenate(index), torch.cat(logits).cpu().numpy()) if index else (np.zeros(0, int), np.zeros(0))
    parts = [mine]
    if run.world > 1:
        parts = [None] * run.world
        torch_dist.all_gather_object(parts, mine)
    rows, values = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    order = np.argsort(rows, kind="stable")
    return rows[order], values[order]


def flush_loss(run: Run) -> None:
    run.state.loss_sum += float(run.pending_loss.item())  # a device sync
    run.pending_loss.zero_()


def all_sum(run: Run, values: list[float]) -> list[float]:
    if run.world == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=run.device)
    torch_dist.all_reduce(total)
    return total.tolist()


def metrics(run: Run) -> dict[str, Any]:
    state = run.state
    return {"epochs": state.history, "best_epoch": state.best_epoch,
            "best_val_auc": state.best_auc if state.best_epoch is not None else None,
            "config": jsonable(run.config)}


def write_epoch(run: Run, record: dict[str, Any], improved: bool, ids: np.ndarray, labels: np.ndarray,
                probs: np.ndarray) -> None:
    out = run.config.out
    out.mkdir(parents=True, exist_ok=True)
    if improved:
        _save(checkpoint(run, record["epoch"], full=False), out / "best.pt")
        write_predictions(out / "val_predictions.csv", ids, labels, probs)
        plot_roc(labels, probs, out / "roc.png")
        plot_confusion(labels, probs, out / "confusion.png")
    save_last(run)
    write_json_atomic(out / "metrics.json", metrics(run))
    plot_curves(run.state.history, run.state.best_epoch, out / "curves.png")


def checkpoint(run: Run, epoch: int, full: bool) -> dict[str, Any]:
    config = run.config
    ckpt = {"model": run.model.state_dict(), "arch": config.arch, "width": config.width, "config": jsonable(config),
            **run.norm.stats, "epoch": epoch, "world": run.world,
            "manifest_sha256": run.build_sha256}  # which build: `cv --collect` compares them
    if full:
        ckpt |= {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "state": dataclasses.asdict(run.state)}
    return ckpt


def save_last(run: Run) -> None:
    flush_loss(run)
    run.config.out.mkdir(parents=True, exist_ok=True)
    _save(checkpoint(run, run.state.epoch, full=True), run.config.out / "last.pt")


def _save(ckpt: dict[str, Any], path: Any) -> None:
    tmp = tmp_path(path)
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a torn checkpoint


RESUME_FIXED = ("arch", "width", "val_fold", "batch_size", "seed", "world", "input_size", "stain_norm", "stain_ref")


def restore(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, world: int) -> RunState:
    path = config.out / "last.pt"
    if not path.is_file():
        raise PcamPrepError(f"--resume: {path} does not exist (nothing to resume; drop --resume to start afresh)")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if "optimizer" not in ckpt:
        raise PcamPrepError(f"--resume: {path} holds no optimiser state (resume from a last.pt written by train)")
    # settings that decide what `step` means, or which rows train: they must not change mid-run
    saved = {"input_size": 96, "stain_norm": "none", "stain_ref": None, **ckpt["config"], "width": ckpt["width"],
             "world": ckpt.get("world", 1)}
    now = {**jsonable(config), "world": world}
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_FIXED if saved.get(k) != now[k]]
    if changed:
        raise PcamPrepError(f"--resume: {path} was trained with other settings ({'; '.join(changed)}); "
                            "resume with the same ones, or start a new --out")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    state = RunState(**ckpt["state"])
    logger.info("resuming %s at epoch %d step %d", path, state.epoch, state.step)
    return state
