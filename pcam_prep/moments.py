"""Per-channel moments that merge exactly.

Pixel sums and sums of squares are integers, so partial results from any number of
workers, in any order, add up to the same exact totals; mean and std are derived once, in
float64, at the end. No running-mean drift, no order dependence, byte-identical manifests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np


@dataclass(frozen=True)
class Moments:
    """Pixel count and per-channel integer sums of x and x**2 (x in 0..255)."""

    count: int = 0
    sums: tuple[int, ...] = field(default=(0, 0, 0))
    squares: tuple[int, ...] = field(default=(0, 0, 0))

    def __add__(self, other: Moments) -> Moments:
        return Moments(
            self.count + other.count,
            tuple(a + b for a, b in zip(self.sums, other.sums)),
            tuple(a + b for a, b in zip(self.squares, other.squares)),
        )

    def __sub__(self, other: Moments) -> Moments:
        return Moments(
            self.count - other.count,
            tuple(a - b for a, b in zip(self.sums, other.sums)),
            tuple(a - b for a, b in zip(self.squares, other.squares)),
        )

    @property
    def mean(self) -> list[float]:
        """Per-channel mean on the 0-1 scale."""
        if not self.count:
            return [float("nan")] * len(self.sums)
        return [float(Fraction(s, self.count * 255)) for s in self.sums]

    @property
    def std(self) -> list[float]:
        """Per-channel population std on the 0-1 scale, from exact integer moments."""
        if not self.count:
            return [float("nan")] * len(self.sums)
        n = self.count
        var = [Fraction(n * q - s * s, n * n * 255 * 255) for s, q in zip(self.sums, self.squares)]
        return [float(np.sqrt(float(v))) for v in var]


def merge(parts: list[Moments]) -> Moments:
    total = Moments()
    for part in parts:
        total = total + part
    return total


def channel_moments(images: np.ndarray) -> Moments:
    """Exact moments of a (N, H, W, C) uint8 batch: integer sums in one compiled pass per patch (kernels)."""
    from . import kernels  # Numba: imported by the processes that measure pixels only

    n, h, w, c = images.shape
    sums, squares = np.zeros(c, np.int64), np.zeros(c, np.int64)  # 2**63 > 255**2 * 96*96 * 10**9 patches
    if n:
        kernels.channel_sums(np.ascontiguousarray(images, np.uint8), sums, squares)
    return Moments(n * h * w, tuple(int(v) for v in sums), tuple(int(v) for v in squares))
