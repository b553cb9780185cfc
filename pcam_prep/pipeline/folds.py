"""Stratified (group) k-fold assignment, deterministic for a seed.

Without groups, each class is shuffled with the seed and dealt round-robin into folds, so
fold sizes per class differ by at most one. With groups (e.g. whole-slide images), whole
groups are placed greedily, largest first, into the fold that keeps the per-class counts
closest to an even split, so no group spans two folds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index (int8) per sample; per class, fold sizes differ by at most one."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), np.int8)
    offset = 0
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        order = rng.permutation(len(idx))
        folds[idx[order]] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # rotate so fold 0 isn't always the one with the extra sample
    return folds


def stratified_group_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index (int8) per sample such that every group lies in exactly one fold."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels = np.asarray(labels)
    classes, label_idx = np.unique(labels, return_inverse=True)
    group_ids, group_idx = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    counts = np.zeros((len(group_ids), len(classes)), np.int64)
    np.add.at(counts, (group_idx, label_idx), 1)
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(group_ids))
    order = np.lexsort((tiebreak, -counts.sum(axis=1)))  # largest groups first
    target = counts.sum(axis=0) / k
    fold_counts = np.zeros((k, len(classes)), np.float64)
    group_fold = np.empty(len(group_ids), np.int8)
    for g in order:
        # how much placing g here moves each fold away from (or towards) an even split
        trial = fold_counts + counts[g]
        scale = np.maximum(target, 1)
        cost = ((np.abs(trial - target) - np.abs(fold_counts - target)) / scale).sum(axis=1)
        best = int(np.lexsort((fold_counts.sum(axis=1), cost))[0])
        group_fold[g] = best
        fold_counts[best] += counts[g]
    return group_fold[group_idx]


def assign_folds(train: pd.DataFrame, k: int, seed: int, groups: pd.Series | None = None) -> np.ndarray:
    """Folds for `train` (columns id, label); `groups` maps id -> group when given."""
    labels = train["label"].to_numpy()
    if groups is None:
        return stratified_folds(labels, k, seed)
    group_of = train["id"].map(groups)
    missing = group_of.isna()
    if missing.any():
        # ungrouped ids each form their own group rather than silently joining another
        group_of = group_of.where(~missing, "__id__" + train["id"])
    return stratified_group_folds(labels, group_of.to_numpy(), k, seed)
