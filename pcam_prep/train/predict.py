"""Scoring a checkpoint: the Kaggle submission for the test split, or a labelled fold and its AUC."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PcamPrepError
from ..files import write_csv_atomic
from ..loader import BatchLoader, open_source
from ..manifest import read_manifest
from ..progress import Counter, ProgressFn
from ..schema import REJECTS_NAME
from .augment import dihedral
from .backbones import build_network
from .config import PredictConfig
from .data import Normalise, keep_freed_memory_on_cpu, resolve_device, stream_batches
from .metrics import roc_auc
from .runs import run_checkpoints

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path("runs/train/best.pt")  # where `train` writes by default


@dataclass(frozen=True)
class PredictResult:
    out: Path  # the CSV written
    rows: int  # images scored
    auc: float | None  # for split=val; None for the test split
    seconds: float
    filled: int = 0  # ids the build saw but rejected, given the training prior (listed in `missing`)
    missing: Path | None = None  # the side file listing them: id,reason,label


def load_checkpoint(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The model in a `train` checkpoint, in eval mode on `device`, and the checkpoint itself."""
    path = Path(path)
    if not path.is_file():
        raise PcamPrepError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise PcamPrepError(f"{path} is not a pcam-prep checkpoint (torch.load refused it: {type(exc).__name__}); "
                            "use best.pt or last.pt from `pcam-prep train`") from None
    if not isinstance(ckpt, dict):
        raise PcamPrepError(f"{path} is not a pcam-prep checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    missing = {"model", "arch", "width", "mean", "std", "config"} - set(ckpt)
    if missing:
        raise PcamPrepError(f"{path} is not a pcam-prep checkpoint (missing {', '.join(sorted(missing))})")
    model = build_network(ckpt["arch"], ckpt["width"], ckpt["config"].get("input_size", 96))
    model = model.to(device, memory_format=torch.channels_last)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


@torch.no_grad()
def predict_probs(model: nn.Module, loader: BatchLoader, norm: Normalise, device: torch.device, tta: int = 1,
                  progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, probabilities) for one pass over `loader`, averaged over the first `tta` dihedral views."""
    index, probs = [], []
    counter = Counter(progress, "predict", sum(len(rows) for rows in loader.plan()))
    for batch in stream_batches(loader, device):
        unit = norm.unit(batch.images)  # stain normalisation as trained; no stain jitter at test time
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # as trained
            views = [torch.sigmoid(model(norm(dihedral(unit, code))).float()) for code in range(tta)]
        probs.append(torch.stack(views).mean(0))
        index.append(batch.index)
        counter.add(len(batch.index))
    if not index:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(index), torch.cat(probs).cpu().numpy()


def write_predictions(path: Path, ids: np.ndarray, labels: np.ndarray | None, probs: np.ndarray) -> Path:
    """`id,label` with label = probability (Kaggle), or `id,label,prob` when true labels are given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if labels is None:
        return write_csv_atomic(path, ("id", "label"), ((i, f"{p:.6f}") for i, p in zip(ids, probs)))
    return write_csv_atomic(path, ("id", "label", "prob"),
                            ((i, int(y), f"{p:.6f}") for i, y, p in zip(ids, labels, probs)))


def predict(config: PredictConfig, progress: ProgressFn | None = None) -> PredictResult:
    """Score the test split (or a train fold) and write the CSV; `progress("predict", done, total)`.

    Several checkpoints (or `run`, a cv run's fold models) form an ensemble: the mean of their
    probabilities, each model with its own normalisation and the same TTA.
    """
    start = time.perf_counter()
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory_on_cpu()
    paths = resolve_checkpoints(config)
    models = [load_checkpoint(path, device) for path in paths]
    split, folds = scored_split(config, models[0][1], len(models))
    source = open_source(config.shards, split, folds, config.format)
    if not len(source):
        raise PcamPrepError(f"{config.shards} has no {config.split} images to score")
    loader = BatchLoader(source, config.batch_size, shuffle=False)
    total, index = np.zeros(len(source)), None
    for m, (model, ckpt) in enumerate(models):
        norm = Normalise.from_checkpoint(ckpt, device)  # the training normalisation, whatever these shards say
        index, probs = predict_probs(model, loader, norm, device, config.tta, _offset(progress, m, len(models)))
        total[index] += probs
    probs = (total[index] / len(models)).astype(np.float32)
    labels = None if source.labels is None else source.labels[index]
    ids, filled, missing = source.ids[index], 0, None
    if labels is None:  # a submission: every id the build saw gets a row, scored or not
        rejected = rejected_ids(config.shards, split)
        if rejected:
            ids, probs, missing = fill_rejected(config, ids, probs, rejected)
            filled = len(rejected)
    write_predictions(config.out, ids, labels, probs)
    auc = None if labels is None else roc_auc(labels, probs)
    logger.info("scored %d %s images with %d model(s) (tta %d): %s", len(index), config.split, len(models),
                config.tta, config.out)
    return PredictResult(Path(config.out), len(index), auc, time.perf_counter() - start, filled, missing)


def rejected_ids(shards: Path, split: str) -> dict[str, str]:
    """id -> reason of the `split` inputs the build rejected (stray non-image files are not ids)."""
    path = Path(shards) / REJECTS_NAME
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {r["id"]: r["reason"] for r in rows if r.get("split") == split and r["reason"] != "stray-file" and r["id"]}


def fill_rejected(config: PredictConfig, ids: np.ndarray, probs: np.ndarray,
                  rejected: dict[str, str]) -> tuple[np.ndarray, np.ndarray, Path]:
    """Add the rejected ids with the training prior (share of positives), sorted by id; list them in a side file."""
    train = read_manifest(config.shards)["splits"]["train"]
    prior = train["positives"] / train["count"] if train["count"] else 0.5
    extra = sorted(set(rejected) - set(ids))
    all_ids = np.concatenate([ids, np.array(extra, dtype=ids.dtype if len(ids) else object)])
    all_probs = np.concatenate([probs, np.full(len(extra), prior, np.float32)])
    order = np.argsort(all_ids.astype(str), kind="stable")
    side = write_csv_atomic(Path(config.out).with_suffix(".missing.csv"), ("id", "reason", "label"),
                            ((i, rejected[i], f"{prior:.6f}") for i in extra))
    return all_ids[order], all_probs[order], side


def resolve_checkpoints(config: PredictConfig) -> list[Path]:
    if config.run is not None:
        return run_checkpoints(config.run)
    return list(config.checkpoint) or [DEFAULT_CHECKPOINT]


def scored_split(config: PredictConfig, ckpt: dict[str, Any], n_models: int) -> tuple[str, list[int] | None]:
    """(split, folds) to open: --split val scores a train fold, by default the checkpoint's validation fold."""
    if config.split != "val":
        return config.split, None  # open_source names a split the build lacks
    if config.fold is None and n_models > 1:
        raise PcamPrepError("--split val with several models: pass --fold (each fold model validated on another one)")
    if n_models > 1:
        logger.warning("fold %d trained all but one of these %d models: its AUC is not an honest estimate "
                       "(cv's oof.csv is)", config.fold, n_models)
    return "train", [config.fold if config.fold is not None else ckpt["config"]["val_fold"]]


def _offset(progress: ProgressFn | None, model: int, models: int) -> ProgressFn | None:
    """One progress bar over every model's pass."""
    if progress is None:
        return None
    return lambda stage, done, total: progress(stage, model * total + done, models * total)
