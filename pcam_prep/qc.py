"""Centre-aware image-quality metrics and flags, per patch.

In PCam only the centre window (32:64 of 96) decides the label, so every metric is taken over
the whole patch *and* over that window: a patch that is sharp tissue at the border but
background or out of focus in its centre is a label risk whole-image QC tools do not report.

    tissue, tissue_centre        fraction of pixels with HSV saturation > 0.07 (PCam's background threshold)
    sharpness, sharpness_centre  variance of the 4-neighbour Laplacian of the grey image (grey levels^2), over
                                 the patch's interior and over the centre window's own interior (30x30 at 96)
    p05, p95                     5th / 95th percentile of the grey level (0-255)

Everything is integer arithmetic until the final division, so a patch's numbers do not depend
on which batch or worker measured it (builds stay byte-identical). Blank and tiny-tissue
patches give numbers, never NaN: an all-black pixel has saturation 0, a flat patch sharpness 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PcamPrepError
from .schema import BACKGROUND_SATURATION, centre_window

COLUMNS = ("tissue", "tissue_centre", "sharpness", "sharpness_centre", "p05", "p95")
SATURATION = BACKGROUND_SATURATION  # a pixel is tissue above it


@dataclass(frozen=True)
class Thresholds:
    """When a patch gets each flag (BuildConfig carries these; the README lists the defaults)."""

    centre_tissue: float = 0.10  # centre-background: tissue_centre below this
    blur: float = 25.0  # blurry: sharpness_centre below this, with tissue in the centre
    dark: float = 60.0  # dark: p95 below this (even the brightest pixels are dark)
    bright: float = 235.0  # overexposed: p05 above this (even the darkest pixels are near white)


FLAGS = {
    "centre-background": "centre window is mostly background (tissue_centre < centre_tissue)",
    "blurry": "centre window has tissue but is out of focus (sharpness_centre < blur)",
    "dark": "under-exposed or ink (p95 < dark)",
    "overexposed": "washed out (p05 > bright)",
}


BLOCK = 64  # patches measured at a time: the int16 temporaries of a block stay in cache


def measure(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 6) float64 metrics, columns as `COLUMNS`."""
    out = np.empty((len(images), len(COLUMNS)), np.float64)
    for start in range(0, len(images), BLOCK):
        out[start : start + BLOCK] = _measure_block(images[start : start + BLOCK])
    return out


def _measure_block(images: np.ndarray) -> np.ndarray:
    """`measure` of up to BLOCK patches.

    About 50-100 us a patch on one core: channel planes are made contiguous once, every step
    after that is a whole-array integer operation (no per-pixel reductions over the channel axis,
    which numpy does ~20x slower), and the Laplacian is taken on the flattened image.
    """
    n, h, w, _ = images.shape
    rows, cols = centre_window(h), centre_window(w)
    out = np.empty((n, len(COLUMNS)), np.float64)
    r, g, b = np.ascontiguousarray(images.transpose(3, 0, 1, 2)).astype(np.uint16)
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    tissue = (hi - lo) * 100 > hi * round(SATURATION * 100)  # s = (max-min)/max > 0.07, exactly; 0 where max = 0
    centre = (rows.stop - rows.start) * (cols.stop - cols.start)
    out[:, 0] = tissue.view(np.uint8).reshape(n, -1).sum(axis=1, dtype=np.int64) / (h * w)
    out[:, 1] = tissue[:, rows, cols].view(np.uint8).reshape(n, -1).sum(axis=1, dtype=np.int64) / centre
    grey = ((r * 77 + g * 150 + b * 29 + 128) >> 8).astype(np.int16).reshape(n, h * w)  # ITU-R 601 luma, 0-255
    # 4-neighbour Laplacian of the flattened image: rows 1..h-2 whole; columns 0 and w-1 wrap and are cut below
    lap = grey[:, : -2 * w] + grey[:, 2 * w :] + grey[:, w - 1 : -w - 1] + grey[:, w + 1 : h * w - w + 1]
    lap -= 4 * grey[:, w:-w]
    lap = lap.reshape(n, h - 2, w)[:, :, 1:-1]  # lap[:, i, j] sits at pixel (i+1, j+1)
    out[:, 2] = _variance(lap)
    out[:, 3] = _variance(lap[:, rows.start : rows.stop - 2, cols.start : cols.stop - 2])  # the window's own interior
    out[:, 4:] = _percentiles(grey, (5, 95))
    return out


def _variance(values: np.ndarray) -> np.ndarray:
    """Per-image population variance of integer values.

    The sums are float64 sums of integers below 2**53, so they are exact in any order.
    """
    flat = values.reshape(len(values), -1).astype(np.float64)
    count = flat.shape[1]
    total, squares = flat.sum(axis=1), np.einsum("ij,ij->i", flat, flat)
    return (squares * count - total * total) / (count * count)


def _percentiles(grey: np.ndarray, qs: tuple[int, ...]) -> np.ndarray:
    """Per-image lower percentiles (nearest rank) of 0-255 values, from one histogram per image."""
    n, count = grey.shape
    offsets = (256 * np.arange(n, dtype=np.int64))[:, None]
    hist = np.bincount((grey + offsets).ravel(), minlength=256 * n).reshape(n, 256)
    cumulative = hist.cumsum(axis=1)
    ranks = [max(1, -(-q * count // 100)) for q in qs]  # the smallest value with at least q % at or below it
    return np.stack([(cumulative < rank).sum(axis=1) for rank in ranks], axis=1)


def flag_masks(metrics: np.ndarray, thresholds: Thresholds) -> dict[str, np.ndarray]:
    """Flag name -> (N,) bool, from `measure`'s columns."""
    m = {name: metrics[:, i] for i, name in enumerate(COLUMNS)}
    centre_background = m["tissue_centre"] < thresholds.centre_tissue
    return {
        "centre-background": centre_background,
        "blurry": ~centre_background & (m["sharpness_centre"] < thresholds.blur),
        "dark": m["p95"] < thresholds.dark,
        "overexposed": m["p05"] > thresholds.bright,
    }


def flag_names(masks: dict[str, np.ndarray]) -> list[str]:
    """Per row, its flags joined by ';' ('' for none), in FLAGS order."""
    n = len(next(iter(masks.values()))) if masks else 0
    names = [[] for _ in range(n)]
    for flag in FLAGS:
        for i in np.flatnonzero(masks[flag]):
            names[i].append(flag)
    return [";".join(row) for row in names]


def parse_flags(text: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """'centre-background,blurry' -> a tuple of known flags; an unknown one is refused with the valid ones."""
    if not text:
        return ()
    flags = tuple(f.strip() for f in (text.split(",") if isinstance(text, str) else text) if f.strip())
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise PcamPrepError(f"--drop-flags: unknown QC flag(s) {', '.join(unknown)}; valid flags: {', '.join(FLAGS)}")
    return flags
