"""Stain maths in numpy: tissue pixels, optical density, Macenko stain vectors, Reinhard LAB moments.

Fitting a stain reference is a one-off computation on a few hundred patches, shared by the
trainer (`--stain-norm`, which applies it per batch in torch: train/stain.py) and by `stats`
(stain vectors and concentrations per split). The two sides use the constants and the tissue
rule defined here, and tests check that they agree.

    od       = optical_density(rgb)          -log((I + 1) / 256), Beer-Lambert per channel
    tissue   = tissue_pixels(rgb)            HSV saturation >= 0.07, not dark, not transparent
    stains   = macenko_stains(od[tissue])    (2, 3) unit OD vectors: haematoxylin, eosin
    conc     = concentrations(od, stains)    (N, 2) least-squares stain amounts

Macenko et al. 2009 (ISBI), "A method for normalizing histology slides for quantitative
analysis"; Reinhard et al. 2001, "Color transfer between images" (here in CIE LAB).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import PcamPrepError
from .schema import BACKGROUND_SATURATION

METHODS = ("macenko", "reinhard")
TISSUE_SATURATION = BACKGROUND_SATURATION  # PCam's background threshold, here per pixel: HSV (max-min)/max
DARK = 30 / 255  # pixels whose brightest channel is below this are black artefacts, not tissue
MIN_OD = 0.3  # summed optical density below this is (nearly) transparent: Macenko's beta cut, summed
MIN_TISSUE_SHARE = 0.05  # a patch with fewer tissue pixels passes through normalisation unchanged
ANGLE_PERCENTILE = 1.0  # Macenko's alpha: the stain vectors sit at the 1st and 99th angle percentiles
MIN_ANGLE = 0.05  # radians between the two extreme directions: less is one colour, not two stains
MAX_PERCENTILE = 99.0  # the "max" concentration of a stain, robust to a few outliers
FIT_PIXELS = 200_000  # tissue pixels a pooled reference fit uses at most (a seeded subset)

# Ruifrok & Johnston's H, E, DAB optical densities per R, G, B, as scikit-image's rgb2hed uses them.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
HED_LOG_FLOOR = 1e-6  # rgb2hed clips intensities here and scales OD by -log(1e-6)

# sRGB (D65) to CIE XYZ and the D65 white point, as scikit-image's rgb2lab uses them.
XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


_OD_OF_BYTE = -np.log((np.arange(256) + 1) / 256)  # uint8 images: a table lookup instead of a log per pixel


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """uint8 (or 0-255 float) RGB -> optical density -log((I + 1) / 256): 0 for white, finite for black."""
    rgb = np.asarray(rgb)
    return _OD_OF_BYTE[rgb] if rgb.dtype == np.uint8 else -np.log((rgb.astype(np.float64) + 1) / 256)


def tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) bool: saturated (>= 0.07), not dark and not transparent pixels."""
    rgb = np.asarray(rgb, np.uint8)
    hi, lo = rgb.max(-1) / 255, rgb.min(-1) / 255
    saturation = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
    return (saturation >= TISSUE_SATURATION) & (hi >= DARK) & (optical_density(rgb).sum(-1) >= MIN_OD)


def has_tissue(images: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N,) bool: at least MIN_TISSUE_SHARE of the pixels are tissue (`pixels`: their mask)."""
    pixels = tissue_pixels(images) if pixels is None else pixels
    return pixels.reshape(len(images), -1).mean(1) >= MIN_TISSUE_SHARE


def macenko_stains(od: np.ndarray) -> np.ndarray | None:
    """(N, 3) tissue OD -> (2, 3) unit stain vectors [haematoxylin, eosin]; None if they are not two stains.

    The OD cloud's plane of largest variance, then the directions at the 1st and 99th angle
    percentiles in it (angles measured from the mean direction, so they never wrap at +-pi);
    haematoxylin is the one with more red OD (it is blue-purple).
    """
    if len(od) < 3:
        return None
    _, vectors = np.linalg.eigh(np.cov(od.T))
    plane = vectors[:, [1, 2]]
    projected = od @ plane
    mean = projected.mean(0)
    if np.linalg.norm(mean) < 1e-6:
        return None
    mx, my = mean / np.linalg.norm(mean)
    phi = np.arctan2(mx * projected[:, 1] - my * projected[:, 0], mx * projected[:, 0] + my * projected[:, 1])
    lo, hi = np.percentile(phi, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    if hi - lo < MIN_ANGLE:
        return None
    v1, v2 = (plane @ np.array([mx * np.cos(a) - my * np.sin(a), mx * np.sin(a) + my * np.cos(a)]) for a in (lo, hi))
    stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1])
    return stains / np.linalg.norm(stains, axis=1, keepdims=True)


def concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """(N, 3) OD and (2, 3) stain vectors -> (N, 2) least-squares amounts of each stain."""
    return od @ stains.T @ np.linalg.inv(stains @ stains.T)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 sRGB -> CIE LAB (D65), the same numbers as skimage.color.rgb2lab."""
    unit = np.asarray(rgb, np.float64) / 255
    linear = np.where(unit > 0.04045, ((unit + 0.055) / 1.055) ** 2.4, unit / 12.92)
    t = linear @ XYZ_FROM_RGB.T / WHITE_D65
    f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def tissue_of(images: np.ndarray) -> np.ndarray:
    """(P, 3) uint8 tissue pixels of the tissue patches among `images` (N, H, W, 3)."""
    images = np.asarray(images, np.uint8)
    pixels = tissue_pixels(images)
    keep = has_tissue(images, pixels)
    return images[keep][pixels[keep]]


def fit_reference(images: np.ndarray, method: str, what: str, seed: int = 0) -> dict[str, Any]:
    """A JSON-ready stain reference fitted on the tissue of `images` (N, H, W, 3) uint8.

    macenko: the pooled stain vectors and the 99th percentile of each stain's concentration;
    reinhard: the mean and std of the tissue pixels in LAB. `what` names the images in the
    error raised when they hold no tissue (or, for Macenko, only one colour).
    """
    if method not in METHODS:
        raise ValueError(f"stain method must be one of {', '.join(METHODS)}; got {method!r}")
    pixels = tissue_of(images)
    if not len(pixels):
        raise PcamPrepError(f"{what} holds no tissue: no patch has {MIN_TISSUE_SHARE:.0%} of its pixels with HSV "
                            f"saturation >= {TISSUE_SATURATION}; choose another stain reference")
    if len(pixels) > FIT_PIXELS:
        pixels = pixels[np.sort(np.random.default_rng(seed).choice(len(pixels), FIT_PIXELS, replace=False))]
    base = {"method": method, "images": int(len(images)), "pixels": int(len(pixels))}
    if method == "reinhard":
        lab = rgb_to_lab(pixels)
        return {**base, "lab_mean": lab.mean(0).tolist(), "lab_std": lab.std(0).tolist()}
    od = optical_density(pixels)
    stains = macenko_stains(od)
    if stains is None:
        raise PcamPrepError(f"{what}: its tissue is a single colour, so Macenko cannot tell haematoxylin from "
                            "eosin; choose another stain reference")
    top = np.percentile(concentrations(od, stains), MAX_PERCENTILE, axis=0)
    return {**base, "stains": stains.tolist(), "max_conc": top.tolist()}


def check_reference(reference: Any) -> dict[str, Any]:
    """A reference dict as `fit_reference` writes it (e.g. read back from a checkpoint), checked."""
    method = reference.get("method") if isinstance(reference, dict) else None
    need = {"macenko": {"stains": (2, 3), "max_conc": (2,)}, "reinhard": {"lab_mean": (3,), "lab_std": (3,)}}
    if method not in need:
        raise PcamPrepError(f"not a stain reference (method {method!r}; expected one of {', '.join(METHODS)})")
    for key, shape in need[method].items():
        value = np.asarray(reference.get(key, []), dtype=np.float64)
        if value.shape != shape or not np.isfinite(value).all():
            raise PcamPrepError(f"stain reference: {key} must be finite with shape {shape}, got {reference.get(key)!r}")
    return reference
