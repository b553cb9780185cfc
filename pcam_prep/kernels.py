"""The build's per-pixel loops, compiled with Numba: one pass over each patch instead of ~20 numpy passes.

At 96x96x3 a patch is 27 KB, so every whole-array numpy step streams a batch through cache
again and allocates a temporary; QC alone was ~55 us a patch that way, the largest cost of the
decode stage. Here each patch is read once per quantity, in L1, with integer arithmetic only,
so the results are exactly those of the numpy formulation (tests/test_kernels.py checks it).

Indexing note: inner loops index row views with loop counters that start at 0. Numba wraps
negative indices at run time, and an index like `p - w` that it cannot prove non-negative
keeps LLVM from vectorising the loop (measured 30 us vs 3.5 us for the Laplacian).

Compiled once per machine: the machine code is cached beside this file (or in Numba's user
cache when the package folder is read-only), and build workers import this module while the
driver scans, so no task waits for the compiler.
"""

from __future__ import annotations

import numba
import numpy as np

_OPTIONS = {"cache": True, "nogil": True, "boundscheck": False, "error_model": "numpy"}
_jit = numba.njit(**_OPTIONS)


@_jit
def _is_tissue(r: int, g: int, b: int, saturation_percent: int) -> int:
    """1 when HSV saturation (max - min) / max exceeds saturation_percent / 100, in integers; 0 where max = 0."""
    hi, lo = max(r, max(g, b)), min(r, min(g, b))
    return np.int32((hi - lo) * 100 > hi * saturation_percent)


_HISTOGRAMS = 4  # grey-level histograms filled round-robin: neighbouring pixels share levels, and one table
# would make each increment wait for the previous store to the same bin (17 vs 25 us a patch with the rest)
_EXACT_INT32_PIXELS = (2**31 - 1) // (255 * 255)  # pixels a patch may have for int32 sums of squares


@_jit
def _histogram(levels: np.ndarray, hist: np.ndarray) -> None:
    """Counts of each level (0-255) of `levels` spread over the rows of `hist` (_HISTOGRAMS, 256), reset first."""
    hist[:] = 0
    m = len(levels)
    tail = m - m % _HISTOGRAMS
    for p in range(0, tail, _HISTOGRAMS):
        for t in range(_HISTOGRAMS):
            hist[t, levels[p + t]] += 1
    for p in range(tail, m):
        hist[0, levels[p]] += 1


@_jit
def _laplacian_sums(grey: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> tuple[int, int]:
    """Sum and sum of squares of the 4-neighbour Laplacian of `grey` (H, W) at rows [r0, r1), columns [c0, c1)."""
    s1 = s2 = 0
    width = c1 - c0
    for i in range(r0, r1):
        up, down, mid = grey[i - 1, c0:c1], grey[i + 1, c0:c1], grey[i, c0:c1]
        left, right = grey[i, c0 - 1 : c1 - 1], grey[i, c0 + 1 : c1 + 1]
        for j in range(width):
            lap = np.int32(up[j]) + np.int32(down[j]) + np.int32(left[j]) + np.int32(right[j]) - 4 * np.int32(mid[j])
            s1 += lap
            s2 += lap * lap
    return s1, s2


@_jit
def _variance(s1: int, s2: int, count: int) -> float:
    """Population variance from exact integer sums, in float64 exactly as `(s2 * n - s1 * s1) / (n * n)`."""
    return (float(s2) * count - float(s1) * float(s1)) / (count * count)


@numba.njit("void(uint8[:, :, :, ::1], int64, int64, int64, int64, int64, int64[::1], float64[:, ::1])",
            **_OPTIONS)  # typed: compiled (or loaded from the cache) at import
def qc_metrics(images: np.ndarray, r0: int, r1: int, c0: int, c1: int, saturation_percent: int,
               ranks: np.ndarray, out: np.ndarray) -> None:
    """qc.COLUMNS of each (H, W, 3) uint8 patch into `out` (N, 4 + len(ranks)); the window is rows [r0, r1) x [c0, c1).

    grey = (77 R + 150 G + 29 B + 128) >> 8; sharpness is the Laplacian's variance over the patch's
    interior and over the window's own interior; `ranks` are nearest-rank positions (1-based) of
    the grey levels, so the percentile is the smallest level with at least that many pixels at or below it.
    """
    n, h, w, _ = images.shape
    m = h * w
    grey = np.empty((h, w), np.int16)
    tissue_map = np.empty(m, np.uint8)
    hist = np.empty((_HISTOGRAMS, 256), np.int32)
    centre = (r1 - r0) * (c1 - c0)
    interior = (h - 2) * (w - 2)
    centre_interior = (r1 - r0 - 2) * (c1 - c0 - 2)
    for k in range(n):
        flat = images[k].reshape(m * 3)
        g = grey.reshape(m)
        for p in range(m):  # no cross-iteration state: LLVM vectorises it
            r, gg, b = np.int32(flat[3 * p]), np.int32(flat[3 * p + 1]), np.int32(flat[3 * p + 2])
            tissue_map[p] = _is_tissue(r, gg, b, saturation_percent)
            g[p] = (r * 77 + gg * 150 + b * 29 + 128) >> 8
        tissue = 0
        for p in range(m):
            tissue += np.int32(tissue_map[p])
        tissue_centre = 0
        for i in range(r0, r1):
            row = tissue_map[i * w + c0 : i * w + c1]
            for j in range(c1 - c0):
                tissue_centre += np.int32(row[j])
        _histogram(g, hist)
        s1, s2 = _laplacian_sums(grey, 1, h - 1, 1, w - 1)
        t1, t2 = _laplacian_sums(grey, r0 + 1, r1 - 1, c0 + 1, c1 - 1)
        out[k, 0] = tissue / m
        out[k, 1] = tissue_centre / centre
        out[k, 2] = _variance(s1, s2, interior)
        out[k, 3] = _variance(t1, t2, centre_interior)
        for q in range(len(ranks)):
            level, seen = 0, hist[:, 0].sum()
            while seen < ranks[q] and level < 255:
                level += 1
                seen += hist[:, level].sum()
            out[k, 4 + q] = level


@_jit
def _channel_sums_any(images: np.ndarray, sums: np.ndarray, squares: np.ndarray) -> None:
    """channel_sums for any channel count and patch size, channel by channel in 64-bit."""
    n, h, w, c = images.shape
    m = h * w
    for k in range(n):
        flat = images[k].reshape(m * c)
        for ch in range(c):
            s1 = s2 = 0
            for p in range(m):
                v = np.int64(flat[p * c + ch])
                s1 += v
                s2 += v * v
            sums[ch] += s1
            squares[ch] += s2


@numba.njit("void(uint8[:, :, :, ::1], int64[::1], int64[::1])", **_OPTIONS)
def channel_sums(images: np.ndarray, sums: np.ndarray, squares: np.ndarray) -> None:
    """Add each channel's sum of values and of squares over an (N, H, W, C) uint8 batch to `sums`, `squares` (C,) int64."""
    n, h, w, c = images.shape
    m = h * w
    if c != 3 or m > _EXACT_INT32_PIXELS:
        _channel_sums_any(images, sums, squares)
        return
    for k in range(n):
        flat = images[k].reshape(m * 3)
        # One interleaved pass with 32-bit lanes (a patch's sum of squares fits: 255**2 * m < 2**31).
        a0 = a1 = a2 = q0 = q1 = q2 = np.int32(0)
        for p in range(m):
            x, y, z = np.int32(flat[3 * p]), np.int32(flat[3 * p + 1]), np.int32(flat[3 * p + 2])
            a0 += x
            a1 += y
            a2 += z
            q0 += x * x
            q1 += y * y
            q2 += z * z
        sums[0] += a0
        sums[1] += a1
        sums[2] += a2
        squares[0] += q0
        squares[1] += q1
        squares[2] += q2
