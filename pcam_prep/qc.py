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
PERCENTILES = (5, 95)  # of the grey level: columns p05, p95


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


def measure(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 6) float64 metrics, columns as `COLUMNS`; ~10 us a 96x96 patch on one core."""
    from . import kernels  # Numba loads in ~0.4 s: only processes that measure pay for it (build workers preload it)

    n, h, w, _ = images.shape
    rows, cols = centre_window(h), centre_window(w)
    ranks = np.array([max(1, -(-q * h * w // 100)) for q in PERCENTILES], np.int64)  # nearest rank, 1-based
    out = np.empty((n, len(COLUMNS)), np.float64)
    if n:
        kernels.qc_metrics(np.ascontiguousarray(images, np.uint8), rows.start, rows.stop, cols.start, cols.stop,
                           round(SATURATION * 100), ranks, out)
    return out


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


def flag_names(masks: dict[str, np.ndarray]) -> np.ndarray:
    """Per row, its flags joined by ';' ('' for none), in FLAGS order, as an object array.

    Vectorised: each row's flags are a bit pattern, and the 2**len(FLAGS) possible names are
    made once. A Python list per row cost seconds at 100k rows once the driver's heap was big
    (each list is a garbage-collector allocation).
    """
    n = len(next(iter(masks.values()))) if masks else 0
    code = np.zeros(n, np.int64)
    for bit, flag in enumerate(FLAGS):
        code |= np.asarray(masks[flag], bool).astype(np.int64) << bit
    names = np.array([";".join(f for bit, f in enumerate(FLAGS) if pattern >> bit & 1)
                      for pattern in range(1 << len(FLAGS))], dtype=object)
    return names[code]


def parse_flags(text: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """'centre-background,blurry' -> a tuple of known flags; an unknown one is refused with the valid ones."""
    if not text:
        return ()
    flags = tuple(f.strip() for f in (text.split(",") if isinstance(text, str) else text) if f.strip())
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise PcamPrepError(f"--drop-flags: unknown QC flag(s) {', '.join(unknown)}; valid flags: {', '.join(FLAGS)}")
    return flags
