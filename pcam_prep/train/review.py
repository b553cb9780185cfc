"""Suspect labels from out-of-fold probabilities: confident learning (Northcutt et al., 2021), binary case.

For each class c, the threshold t_c is the mean out-of-fold probability of c over the images
labelled c (how confident the models are, on average, about images that really are c). An
image labelled y is a suspect when its probability of the other class c clears t_c; its margin
is p_c - t_c, and suspects are ranked by it, largest first. Nothing is dropped: the list is for
a person to look at (and `build --exclude` to act on).

These are the few lines of cleanlab's `find_label_issues(filter_by="confident_learning")` for
two classes, written here because recent cleanlab releases are AGPL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import binary_pair


@dataclass(frozen=True)
class Suspects:
    rows: np.ndarray  # indices into the inputs, most suspect first
    margin: np.ndarray  # p(other class) - that class's threshold, > 0 ... for each row, same order
    thresholds: tuple[float, float]  # (t_0, t_1); NaN for a class no image is labelled with


def class_thresholds(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(t_0, t_1): mean P(class 0) over images labelled 0, mean P(class 1) over images labelled 1."""
    y, p = _check(labels, probs)
    t0 = float(np.mean(1.0 - p[~y])) if (~y).any() else float("nan")
    t1 = float(np.mean(p[y])) if y.any() else float("nan")
    return t0, t1


def find_suspects(labels: np.ndarray, probs: np.ndarray) -> Suspects:
    """Images whose probability for the class they are *not* labelled with clears that class's threshold."""
    y, p = _check(labels, probs)
    t0, t1 = class_thresholds(y, p)
    other_prob = np.where(y, 1.0 - p, p)  # P(the other class)
    other_threshold = np.where(y, t0, t1)
    margin = other_prob - other_threshold
    suspect = np.flatnonzero(~np.isnan(margin) & (margin >= 0))
    order = suspect[np.lexsort((suspect, -margin[suspect]))]  # ties: input order
    return Suspects(order, margin[order], (t0, t1))


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = binary_pair(labels, probs, "probs")
    if p.size and not ((p >= 0) & (p <= 1)).all():
        raise ValueError("probs must lie in [0, 1]")
    return y, p
