"""Binary classification metrics in plain numpy (no sklearn): AUC, ROC curve, loss, accuracy, confusion."""

from __future__ import annotations

import numpy as np


def binary_pair(labels: np.ndarray, scores: np.ndarray, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """(labels as bool, scores as float64), flat, after checking they pair up and labels are 0/1."""
    y, s = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and {name} differ in length: {y.size} vs {s.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(y)[:5].tolist()}")
    return y.astype(bool), s


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting one half.

    Computed from ranks (Mann-Whitney U) in O(n log n). NaN when either class is missing.
    """
    y, s = binary_pair(labels, scores)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    rank_sum = average_ranks(s)[y].sum()
    return float((rank_sum - pos * (pos + 1) / 2.0) / (pos * neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) with one point per distinct threshold, from (0, 0) to (1, 1); ties move together."""
    y, s = binary_pair(labels, scores)
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    cut = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.array([], int)
    tpr = np.r_[0.0, np.cumsum(y)[cut] / max(1, y.sum())]
    fpr = np.r_[0.0, np.cumsum(~y)[cut] / max(1, (~y).sum())]
    return fpr, tpr


def bce_with_logits(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of `logits` against 0/1 `labels`, computed stably."""
    y, z = binary_pair(labels, logits)
    if not y.size:
        return float("nan")
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def accuracy(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
    y, p = binary_pair(labels, probs)
    return float(np.mean((p >= threshold) == y)) if y.size else float("nan")


def confusion(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """2x2 counts: rows are the true label (0, 1), columns the predicted label."""
    y, p = binary_pair(labels, probs)
    guess = p >= threshold
    return np.array([[np.sum(~y & ~guess), np.sum(~y & guess)], [np.sum(y & ~guess), np.sum(y & guess)]])


def sigmoid(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))
