"""Deliberate label noise: flip a share of the train labels and record which, so a test can check who finds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import write_csv_atomic

TRUTH_NAME = "label_noise.csv"  # id,given_label,true_label of every flipped train image
_NOISE_STREAM = 0x4E015E  # the flips draw from their own stream: the same seed gives the same pixels with or without


def flip_rows(n: int, share: float, seed: int) -> np.ndarray:
    """round(n * share) distinct rows out of n, sorted; the same (n, share, seed) gives the same rows."""
    if not 0.0 <= share <= 0.5:  # also rejects NaN; beyond half the flipped label is the majority
        raise ValueError(f"label_noise must be in [0, 0.5], got {share!r}")
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    return np.sort(rng.choice(n, size=int(round(n * share)), replace=False))


def write_truth(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    """`id,given_label,true_label`, sorted by id."""
    return write_csv_atomic(path, ("id", "given_label", "true_label"), sorted(rows))
