"""The compiled per-patch loops give exactly what the numpy formulation they replaced gave.

Exact equality, not approx: QC metrics and moments are written into qc.csv and the manifest,
and a build must be byte-identical to one made before the loops were compiled.
"""

from __future__ import annotations

import numpy as np
import pytest

from pcam_prep import qc
from pcam_prep.moments import channel_moments
from pcam_prep.schema import centre_window
from pcam_prep.synth.kaggle import make_patch


def numpy_measure(images: np.ndarray) -> np.ndarray:
    """qc.measure as it was written in numpy (pcam-prep 0.1): whole-array integer steps."""
    n, h, w, _ = images.shape
    rows, cols = centre_window(h), centre_window(w)
    out = np.empty((n, 6), np.float64)
    r, g, b = np.ascontiguousarray(images.transpose(3, 0, 1, 2)).astype(np.uint16)
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    tissue = (hi - lo) * 100 > hi * 7
    centre = (rows.stop - rows.start) * (cols.stop - cols.start)
    out[:, 0] = tissue.view(np.uint8).reshape(n, -1).sum(axis=1, dtype=np.int64) / (h * w)
    out[:, 1] = tissue[:, rows, cols].view(np.uint8).reshape(n, -1).sum(axis=1, dtype=np.int64) / centre
    grey = ((r * 77 + g * 150 + b * 29 + 128) >> 8).astype(np.int16).reshape(n, h * w)
    lap = grey[:, : -2 * w] + grey[:, 2 * w :] + grey[:, w - 1 : -w - 1] + grey[:, w + 1 : h * w - w + 1]
    lap -= 4 * grey[:, w:-w]
    lap = lap.reshape(n, h - 2, w)[:, :, 1:-1]

    def variance(values: np.ndarray) -> np.ndarray:
        flat = values.reshape(len(values), -1).astype(np.float64)
        count = flat.shape[1]
        total, squares = flat.sum(axis=1), np.einsum("ij,ij->i", flat, flat)
        return (squares * count - total * total) / (count * count)

    out[:, 2] = variance(lap)
    out[:, 3] = variance(lap[:, rows.start : rows.stop - 2, cols.start : cols.stop - 2])
    hist = np.stack([np.bincount(row, minlength=256) for row in grey]).cumsum(axis=1)
    for j, q in enumerate((5, 95)):
        out[:, 4 + j] = (hist < max(1, -(-q * h * w // 100))).sum(axis=1)
    return out


def patches() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    tissue = np.stack([make_patch(np.random.default_rng(s), s % 2)[0] for s in range(40)])
    return {
        "synthetic tissue": tissue,
        "uniform noise": rng.integers(0, 256, (64, 96, 96, 3), dtype=np.uint8),
        "extremes": rng.choice(np.array([0, 255], np.uint8), (16, 96, 96, 3)),
        "black and white": np.stack([np.zeros((96, 96, 3), np.uint8), np.full((96, 96, 3), 255, np.uint8)]),
        "not 96 and not square": rng.integers(0, 256, (8, 50, 71, 3), dtype=np.uint8),
        "all 255, past 32-bit per-patch sums": np.full((2, 190, 190, 3), 255, np.uint8),
    }


@pytest.mark.parametrize("name", list(patches()))
def test_qc_metrics_equal_the_numpy_formulation_exactly(name: str) -> None:
    images = patches()[name]
    np.testing.assert_array_equal(qc.measure(images), numpy_measure(images))


def test_qc_takes_strided_batches_and_empty_ones() -> None:
    images = patches()["uniform noise"]
    np.testing.assert_array_equal(qc.measure(images[::3]), numpy_measure(images[::3]))
    assert qc.measure(images[:0]).shape == (0, len(qc.COLUMNS))


@pytest.mark.parametrize("name", list(patches()))
def test_channel_moments_are_the_exact_integer_sums(name: str) -> None:
    images = patches()[name]
    wide = images.astype(np.int64)
    m = channel_moments(images)
    assert m.count == images.shape[0] * images.shape[1] * images.shape[2]
    assert m.sums == tuple(int(v) for v in wide.sum(axis=(0, 1, 2)))
    assert m.squares == tuple(int(v) for v in (wide * wide).sum(axis=(0, 1, 2)))


@pytest.mark.parametrize("channels", [1, 4])
def test_channel_moments_of_other_channel_counts(channels: int) -> None:
    images = np.random.default_rng(3).integers(0, 256, (5, 20, 30, channels), dtype=np.uint8)
    wide = images.astype(np.int64)
    m = channel_moments(images)
    assert m.sums == tuple(int(v) for v in wide.sum(axis=(0, 1, 2)))
    assert m.squares == tuple(int(v) for v in (wide * wide).sum(axis=(0, 1, 2)))
