"""Run figures (matplotlib, Agg backend): learning curves, validation ROC, confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..figures import figure as _figure
from ..figures import save as _save
from .metrics import confusion, roc_auc, roc_curve


def plot_curves(history: list[dict[str, Any]], best_epoch: int | None, path: Path) -> Path:
    """Loss (train and val), accuracy and AUC by epoch, the best epoch marked."""
    x = [r["epoch"] for r in history]
    fig = _figure(12, 3.4)
    panels = ((("train_loss", "val_loss"), "loss"), (("val_acc",), "accuracy"), (("val_auc",), "AUC"))
    for ax, (keys, title) in zip(fig.subplots(1, 3), panels):
        for key in keys:
            ax.plot(x, [r.get(key, np.nan) for r in history], marker="o", ms=3, label=key)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="gray", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_roc(labels: np.ndarray, probs: np.ndarray, path: Path, title: str = "validation ROC") -> Path:
    fpr, tpr = roc_curve(labels, probs)
    fig = _figure(4.2, 4)
    ax = fig.subplots()
    ax.plot(fpr, tpr, lw=1.5, label=f"AUC {roc_auc(labels, probs):.4f}")
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1)
    ax.set(title=title, xlabel="false positive rate", ylabel="true positive rate", aspect="equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(labels: np.ndarray, probs: np.ndarray, path: Path, threshold: float = 0.5) -> Path:
    matrix = confusion(labels, probs, threshold)
    fig = _figure(4, 3.6)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for (true, guess), count in np.ndenumerate(matrix):
        ax.text(guess, true, f"{count:,}", ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    ax.set(title=f"validation, threshold {threshold}", xlabel="predicted label", ylabel="true label",
           xticks=[0, 1], yticks=[0, 1])
    return _save(fig, path)
