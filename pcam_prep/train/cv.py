"""k-fold cross-validation: one `train` run per fold, out-of-fold predictions, and an honest estimate.

    for each fold K:  RUN/fold-K = train(val_fold=K)      a normal, resumable train run folder
                      fold-K/oof.csv = score fold K with fold-K/best.pt (TTA as `predict --tta`)
                      fold-K/fold.json                    written last: the fold is done
    collect(RUN):     oof.csv, label_review.csv, then cv.json (per-fold AUC, pooled OOF AUC,
                      mean +- std, stratified bootstrap 95 % CI, grouping, speed)

Folds run one after another here; on a cluster each job runs `cv --folds K` (or one torchrun per
fold) and `cv --collect RUN` assembles them once all are done. A fold whose fold.json exists is
skipped; one with a last.pt but no fold.json resumes.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PcamPrepError
from ..files import write_csv_atomic, write_json_atomic
from ..loader import BatchLoader, open_source
from ..manifest import manifest_digest, read_manifest
from .config import TTA_CHOICES, TrainConfig
from .data import Normalise, resolve_device
from .metrics import roc_auc
from .predict import load_checkpoint, predict_probs
from .review import find_suspects
from .runs import CV_RESULT, FOLD_OOF, FOLD_RESULT, OOF, REVIEW, complete_run, finished_folds, fold_dir, missing_folds

logger = logging.getLogger(__name__)

OOF_COLUMNS = ("id", "label", "fold", "prob")


@dataclass(frozen=True)
class CvConfig:
    train: TrainConfig  # what every fold trains with; train.out is RUN, train.val_fold and resume are set per fold
    folds: tuple[int, ...] | None = None  # folds to train in this process; None: every fold of the build
    tta: int = 1  # dihedral views averaged when scoring each held-out fold, as `predict --tta`
    resamples: int = 1000  # stratified bootstrap resamples for the CI of the pooled OOF AUC
    ci_seed: int = 0  # bootstrap seed: the same OOF predictions give the same interval

    def __post_init__(self) -> None:
        if self.tta not in TTA_CHOICES:
            raise PcamPrepError(f"tta must be one of {', '.join(map(str, TTA_CHOICES))}; got {self.tta!r}")
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int) or self.resamples < 1000:
            raise PcamPrepError(f"resamples must be an integer >= 1000, got {self.resamples!r}")
        if self.folds is not None and (not self.folds or len(set(self.folds)) != len(self.folds)):
            raise PcamPrepError(f"folds must list distinct fold numbers, got {self.folds!r}")


def check_folds(manifest: dict[str, Any], shards: Path, folds: tuple[int, ...] | None) -> list[int]:
    """The folds to train: all of the build's by default; a one-line error for a build or fold that cannot be."""
    k = manifest["folds"]["k"]
    if k < 2:
        raise PcamPrepError(f"{shards} has {k} fold: cross-validation needs at least 2 (rebuild with --folds 5)")
    bad = sorted(f for f in folds or () if not 0 <= f < k)
    if bad:
        raise PcamPrepError(f"--folds {','.join(map(str, bad))}: {shards} has folds 0..{k - 1}")
    return sorted(folds) if folds else list(range(k))


def cross_validate(config: CvConfig, progress: Callable[[int, Any], None] | None = None) -> dict[str, Any] | None:
    """Train and score the requested folds; then, when every fold is done, collect. `progress(fold, event)`.

    Returns the cv.json summary, or None while folds are missing (and on ranks other than 0).
    """
    manifest = read_manifest(config.train.shards)
    folds = check_folds(manifest, config.train.shards, config.folds)
    run = config.train.out
    rank = int(os.environ.get("RANK", "0"))
    for fold in folds:
        if (fold_dir(run, fold) / FOLD_RESULT).is_file():
            logger.info("fold %d already done: %s", fold, fold_dir(run, fold))
            continue
        train_fold(config, fold, manifest, None if progress is None else lambda e, f=fold: progress(f, e))
    if rank != 0:
        return None
    missing = missing_folds(finished_folds(run), manifest["folds"]["k"])
    if missing:
        logger.info("folds %s not done yet; `pcam-prep cv --collect %s` once they are", missing, run)
        return None
    return collect(run, config.resamples, config.ci_seed)


def train_fold(config: CvConfig, fold: int, manifest: dict[str, Any], progress: Callable | None) -> dict[str, Any]:
    """Train fold `fold` (resuming a run that has a last.pt), score its held-out images, write fold.json."""
    from .loop import train  # the loop pulls in plotting and DDP; scoring and collecting do not need them

    out = fold_dir(config.train.out, fold)
    resume = (out / "last.pt").is_file()
    metrics = train(dataclasses.replace(config.train, out=out, val_fold=fold, resume=resume), progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    auc, rows = score_fold(config, fold, out)
    epochs = metrics["epochs"]
    result = {
        "fold": fold, "auc": auc, "images": rows, "best_epoch": metrics["best_epoch"],
        "best_val_auc_no_tta": metrics["best_val_auc"], "epochs_trained": len(epochs), "tta": config.tta,
        "images_per_s": float(np.mean([e["images_per_s"] for e in epochs])) if epochs else None,
        "data_wait_frac": float(np.mean([e["data_wait_frac"] for e in epochs])) if epochs else None,
        "folds": {key: manifest["folds"][key] for key in ("k", "seed", "grouped", "group_by")},
        "train_images": manifest["splits"]["train"]["count"],
        "manifest_sha256": manifest_digest(config.train.shards), "config": metrics["config"],
    }
    write_json_atomic(out / FOLD_RESULT, result)  # last: the fold is done
    return result


def score_fold(config: CvConfig, fold: int, out: Path) -> tuple[float, int]:
    """Score fold `fold` with the model that did not see it; write fold-K/oof.csv. Returns (AUC, rows)."""
    device = resolve_device(config.train.device)
    model, ckpt = load_checkpoint(out / "best.pt", device)
    source = open_source(config.train.shards, "train", [fold], config.train.format)
    loader = BatchLoader(source, 2 * config.train.batch_size, shuffle=False)
    index, probs = predict_probs(model, loader, Normalise.from_checkpoint(ckpt, device), device, config.tta)
    labels = source.labels[index]
    write_oof(out / FOLD_OOF, source.ids[index], labels, np.full(len(index), fold), probs)
    return roc_auc(labels, probs), len(index)


def write_oof(path: Path, ids: np.ndarray, labels: np.ndarray, folds: np.ndarray, probs: np.ndarray) -> Path:
    return write_csv_atomic(path, OOF_COLUMNS,
                            ((i, int(y), int(f), f"{p:.6f}") for i, y, f, p in zip(ids, labels, folds, probs)))


def read_oof(path: Path) -> dict[str, np.ndarray]:
    """An oof.csv as columns: id (str), label (int8), fold (int16), prob (float64)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or tuple(rows[0]) != OOF_COLUMNS:
        raise PcamPrepError(f"{path} is not an oof.csv (expected columns {','.join(OOF_COLUMNS)})")
    cols = list(zip(*rows[1:])) or [(), (), (), ()]
    return {"id": np.array(cols[0], dtype=object), "label": np.array(cols[1], dtype=np.int8),
            "fold": np.array(cols[2], dtype=np.int16), "prob": np.array(cols[3], dtype=np.float64)}


def collect(run: Path, resamples: int = 1000, ci_seed: int = 0) -> dict[str, Any]:
    """Assemble a cv run whose folds are all done: RUN/oof.csv, label_review.csv, then cv.json (returned)."""
    run = Path(run)
    results = complete_run(run)
    check_same_build(run, results)
    (run / CV_RESULT).unlink(missing_ok=True)  # no cv.json beside a half-rewritten oof.csv
    parts = [read_oof(fold_dir(run, fold) / FOLD_OOF) for fold in sorted(results)]
    oof = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    expected = results[min(results)]["train_images"]
    if len(oof["id"]) != expected or len(set(oof["id"])) != expected:
        raise PcamPrepError(f"{run}: the folds' oof.csv hold {len(oof['id'])} rows ({len(set(oof['id']))} distinct "
                            f"ids) for a build of {expected} train images")
    write_oof(run / OOF, oof["id"], oof["label"], oof["fold"], oof["prob"])
    suspects = write_review(run / REVIEW, oof)
    summary = summarise(results, oof, resamples, ci_seed) | {"suspects": suspects}
    write_json_atomic(run / CV_RESULT, summary)  # last: a run with cv.json is whole
    return summary


def check_same_build(run: Path, results: dict[int, dict[str, Any]]) -> None:
    """Every fold's checkpoint must record the same manifest digest: folds from different builds do not pool."""
    digests: dict[str, list[int]] = {}
    for fold in sorted(results):
        path = fold_dir(run, fold) / "best.pt"
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
        digests.setdefault(ckpt.get("manifest_sha256") or "unrecorded", []).append(fold)
    if len(digests) > 1:
        groups = "; ".join(f"fold(s) {','.join(map(str, f))} on build {d[:12]}" for d, f in digests.items())
        raise PcamPrepError(f"{run}: folds were trained on different builds ({groups}); retrain them on one build")


def summarise(results: dict[int, dict[str, Any]], oof: dict[str, np.ndarray], resamples: int,
              ci_seed: int) -> dict[str, Any]:
    """cv.json: per-fold AUC and speed, the pooled OOF AUC with its bootstrap CI, mean +- std, grouping."""
    folds_meta = results[min(results)]["folds"]
    fold_aucs = [results[f]["auc"] for f in sorted(results)]
    pooled = roc_auc(oof["label"], oof["prob"])
    low, high = bootstrap_auc_ci(oof["label"], oof["prob"], resamples, ci_seed)
    grouped = bool(folds_meta["grouped"])
    return {
        "folds": [{key: results[f][key] for key in ("fold", "auc", "images", "best_epoch", "epochs_trained",
                                                     "images_per_s", "data_wait_frac")} for f in sorted(results)],
        "k": folds_meta["k"], "grouped": grouped, "group_by": folds_meta["group_by"],
        "warning": None if grouped else ("folds are stratified but not grouped by slide: patches of one slide can "
                                         "sit in train and validation, so these AUCs may be optimistic"),
        "pooled_oof_auc": pooled, "mean_fold_auc": float(np.mean(fold_aucs)),
        "std_fold_auc": float(np.std(fold_aucs, ddof=1)),
        "ci95": {"low": low, "high": high, "resamples": resamples, "seed": ci_seed, "method": "stratified bootstrap"},
        "tta": results[min(results)]["tta"], "images": len(oof["id"]),
        "manifest_sha256": results[min(results)]["manifest_sha256"],
        "config": {k: v for k, v in results[min(results)]["config"].items() if k not in ("out", "val_fold", "resume")},
    }


def write_review(path: Path, oof: dict[str, np.ndarray]) -> int:
    """label_review.csv: the confident-learning suspects, most suspect first. Returns how many."""
    found = find_suspects(oof["label"], oof["prob"])
    write_csv_atomic(path, ("rank", "id", "label", "fold", "prob", "margin"),
                     ((rank, oof["id"][r], int(oof["label"][r]), int(oof["fold"][r]), f"{oof['prob'][r]:.6f}",
                       f"{m:.6f}") for rank, (r, m) in enumerate(zip(found.rows, found.margin), start=1)))
    return len(found.rows)


def bootstrap_auc_ci(labels: np.ndarray, probs: np.ndarray, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUC over stratified bootstrap resamples (positives and negatives apart).

    The scores are sorted once; each resample is then a weighting of the sorted rows (how often
    each was drawn), and its AUC a weighted Mann-Whitney sum over tie blocks: O(n) per resample.
    """
    y, s = np.asarray(labels).astype(bool), np.asarray(probs, dtype=np.float64)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if not len(pos) or not len(neg):
        return float("nan"), float("nan")
    order = np.argsort(s, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(s[order])) + 1]  # tie blocks of the sorted scores
    rank_of = np.empty(len(s), np.int64)
    rank_of[order] = np.arange(len(s))
    rng = np.random.default_rng(seed)
    aucs = np.empty(resamples)
    n = len(s)
    for i in range(resamples):
        w_pos = np.add.reduceat(np.bincount(rank_of[pos[rng.integers(0, len(pos), len(pos))]], minlength=n), starts)
        w_neg = np.add.reduceat(np.bincount(rank_of[neg[rng.integers(0, len(neg), len(neg))]], minlength=n), starts)
        below = np.cumsum(w_neg) - w_neg
        aucs[i] = np.sum(w_pos * (below + 0.5 * w_neg)) / (len(pos) * len(neg))
    tail = (1 - level) / 2
    low, high = np.quantile(aucs, [tail, 1 - tail])
    return float(low), float(high)

