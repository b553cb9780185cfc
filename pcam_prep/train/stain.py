"""Stain normalisation (Macenko, Reinhard) and HED jitter as batched torch ops on the device.

Inputs are float (B, 3, H, W) batches on 0-1 scale, straight from `Normalise.unit`. Each image
gets its own stain estimate (batched eigh, masked percentiles), mapped onto a reference fitted
once with `pcam_prep.stain` (numpy). Only tissue pixels (the rule in `pcam_prep.stain`) change;
an image with too little tissue, or with one colour only, passes through unchanged, and no
branch can produce NaN: invalid images are selected away with `torch.where`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import stain as ref
from ..errors import PcamPrepError
from ..loader import Source, open_source

logger = logging.getLogger(__name__)

REF_SAMPLE = 256  # train patches the default reference is fitted on (seeded)
# Each image's stain vectors and 99th-percentile amounts come from every 4th pixel (2,304 of a 96x96
# patch): the sorts behind the percentiles were most of the cost, and the estimate barely moves.
ESTIMATE_STRIDE = 4


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H*W, 3); a view when x is channels_last."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 3)


def _image(pixels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, _, h, w = like.shape
    return pixels.reshape(b, h, w, 3).permute(0, 3, 1, 2)


def optical_density(pixels: torch.Tensor) -> torch.Tensor:
    return -torch.log((pixels * 255 + 1) / 256)


def tissue_mask(pixels: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) on 0-1 -> (B, N) bool, the rule of `pcam_prep.stain.tissue_pixels`."""
    hi, lo = pixels.amax(-1), pixels.amin(-1)
    saturation = (hi - lo) / hi.clamp_min(1e-12)
    return (saturation >= ref.TISSUE_SATURATION) & (hi >= ref.DARK) & (optical_density(pixels).sum(-1) >= ref.MIN_OD)


def masked_percentiles(values: torch.Tensor, mask: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """(B, N) values -> (B, len(qs)) percentiles of each row's masked values (numpy's linear rule), one sort.

    Rows with no masked value give a finite, meaningless number: callers select them away.
    """
    count = mask.sum(1, keepdim=True)
    ordered = torch.where(mask, values, torch.full_like(values, torch.finfo(values.dtype).max)).sort(1).values
    last = (count - 1).clamp_min(0)
    pos = last.to(values.dtype) * torch.tensor(qs, dtype=values.dtype, device=values.device) / 100
    lo = pos.floor().long()
    a, b = ordered.gather(1, lo), ordered.gather(1, torch.minimum(lo + 1, last))
    return torch.where(count > 0, a + (b - a) * (pos - lo), torch.zeros_like(a))


def macenko_stains(od: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (B, 2, 3) unit stain vectors [H, E] of the masked OD pixels, and (B,) whether they are valid.

    The batched form of `pcam_prep.stain.macenko_stains`.
    """
    weight = mask.unsqueeze(-1).to(od.dtype)
    count = weight.sum(1).clamp_min(2)
    centred = (od - (od * weight).sum(1, keepdim=True) / count[:, None]) * weight
    _, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred / (count[:, None] - 1))
    plane = vectors[:, :, 1:]  # (B, 3, 2): the two largest
    projected = od @ plane
    mean = (projected * weight).sum(1) / count
    norm = mean.norm(dim=1, keepdim=True)
    m = mean / norm.clamp_min(1e-12)
    mx, my = m[:, :1], m[:, 1:]
    phi = torch.atan2(mx * projected[..., 1] - my * projected[..., 0], mx * projected[..., 0] + my * projected[..., 1])
    lo, hi = masked_percentiles(phi, mask, (ref.ANGLE_PERCENTILE, 100 - ref.ANGLE_PERCENTILE)).split(1, 1)

    def direction(a: torch.Tensor) -> torch.Tensor:
        return (plane @ torch.cat([mx * a.cos() - my * a.sin(), mx * a.sin() + my * a.cos()], 1)[..., None])[..., 0]

    v1, v2 = direction(lo), direction(hi)
    first = v1[:, :1] > v2[:, :1]
    stains = torch.stack([torch.where(first, v1, v2), torch.where(first, v2, v1)], 1)
    stains = stains / stains.norm(dim=2, keepdim=True).clamp_min(1e-12)
    valid = (norm[:, 0] >= 1e-6) & ((hi - lo)[:, 0] >= ref.MIN_ANGLE) & (mask.sum(1) >= 3)
    return stains, valid


def concentrations(od: torch.Tensor, stains: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) OD, (B, 2, 3) stains -> (B, N, 2) least-squares amounts (identity basis where not valid)."""
    eye = torch.eye(2, 3, dtype=od.dtype, device=od.device).expand_as(stains)
    stains = torch.where(valid[:, None, None], stains, eye)  # keeps the inverse finite; selected away later
    return od @ stains.transpose(1, 2) @ torch.linalg.inv(stains @ stains.transpose(1, 2))


class StainNormaliser:
    """Maps each image's stains onto a fitted reference (`pcam_prep.stain.fit_reference`), on the device."""

    def __init__(self, reference: dict[str, Any], device: torch.device) -> None:
        self.reference = ref.check_reference(reference)
        self.method = reference["method"]
        tensor = lambda key: torch.tensor(reference[key], dtype=torch.float32, device=device)  # noqa: E731
        if self.method == "macenko":
            self.stains, self.max_conc = tensor("stains"), tensor("max_conc")
        else:
            self.lab_mean, self.lab_std = tensor("lab_mean"), tensor("lab_std")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pixels = _pixels(x)
        mask = tissue_mask(pixels)
        enough = mask.float().mean(1) >= ref.MIN_TISSUE_SHARE
        out, valid = (self._macenko if self.method == "macenko" else self._reinhard)(pixels, mask)
        keep = (mask & (enough & valid)[:, None]).unsqueeze(-1)
        return _image(torch.where(keep, out, pixels), x)

    def _macenko(self, pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        od = optical_density(pixels)
        few, few_mask = od[:, ::ESTIMATE_STRIDE], mask[:, ::ESTIMATE_STRIDE]  # the estimate: every 4th pixel
        stains, valid = macenko_stains(few, few_mask)
        conc = concentrations(od, stains, valid)
        both = conc[:, ::ESTIMATE_STRIDE].transpose(1, 2).reshape(-1, few.shape[1])  # (2B, N/4): H rows, E rows
        top = masked_percentiles(both, few_mask.repeat_interleave(2, 0), (ref.MAX_PERCENTILE,)).view(-1, 2)
        valid = valid & (top > 1e-6).all(1)
        conc = conc * (self.max_conc / top.clamp_min(1e-6))[:, None]
        rgb = (256 * torch.exp(-(conc @ self.stains)) - 1) / 255
        return rgb.clamp(0, 1), valid

    def _reinhard(self, pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lab = rgb_to_lab(pixels)
        weight = mask.unsqueeze(-1).to(lab.dtype)
        count = weight.sum(1).clamp_min(1)
        mean = (lab * weight).sum(1) / count
        std = (((lab - mean[:, None]) ** 2 * weight).sum(1) / count).sqrt()
        valid = (std > 1e-3).all(1)
        lab = (lab - mean[:, None]) / std.clamp_min(1e-3)[:, None] * self.lab_std + self.lab_mean
        return lab_to_rgb(lab), valid


@functools.lru_cache(maxsize=16)
def _constants(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The colour matrices on `device`, made once: a fresh host tensor per step would be a copy (and a sync)."""
    arrays = {"xyz_from_rgb": ref.XYZ_FROM_RGB.T, "rgb_from_xyz": np.linalg.inv(ref.XYZ_FROM_RGB).T,
              "white": ref.WHITE_D65, "hed_from_rgb": ref.HED_FROM_RGB, "rgb_from_hed": ref.RGB_FROM_HED}
    return {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in arrays.items()}


def _constant(name: str, like: torch.Tensor) -> torch.Tensor:
    return _constants(like.device, like.dtype)[name]


def rgb_to_lab(pixels: torch.Tensor) -> torch.Tensor:
    """(..., 3) sRGB on 0-1 -> CIE LAB (D65), as `pcam_prep.stain.rgb_to_lab`."""
    linear = torch.where(pixels > 0.04045, ((pixels + 0.055) / 1.055) ** 2.4, pixels / 12.92)
    t = linear @ _constant("xyz_from_rgb", pixels) / _constant("white", pixels)
    f = torch.where(t > 0.008856, t.clamp_min(0) ** (1 / 3), 7.787 * t + 16 / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE LAB (D65) -> sRGB on 0-1, clamped (the inverse of `rgb_to_lab` inside the gamut)."""
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    t = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * _constant("white", lab)
    linear = (t @ _constant("rgb_from_xyz", lab)).clamp_min(0)
    return torch.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear).clamp(0, 1)


def rgb_to_hed(pixels: torch.Tensor) -> torch.Tensor:
    """(..., 3) RGB on 0-1 -> H, E, DAB on scikit-image's rgb2hed scale, not clipped at 0 (so it inverts)."""
    scale = -np.log(ref.HED_LOG_FLOOR)
    return -torch.log(pixels.clamp_min(ref.HED_LOG_FLOOR)) / scale @ _constant("hed_from_rgb", pixels)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """The inverse of `rgb_to_hed`, clamped to 0-1: scikit-image's hed2rgb."""
    scale = -np.log(ref.HED_LOG_FLOOR)
    return torch.exp(-(hed * scale) @ _constant("rgb_from_hed", hed)).clamp(0, 1)


def hed_jitter(x: torch.Tensor, generator: torch.Generator, sigma: float) -> torch.Tensor:
    """Tellez et al. 2018: per image and stain, concentration * U(1-sigma, 1+sigma) + U(-sigma, sigma).

    Only tissue pixels change (white background stays white); randomness only from `generator`.
    """
    b = x.shape[0]
    u = torch.rand((b, 2, 1, 3), generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    return hed_perturb(x, 1 + sigma * u[:, 0], sigma * u[:, 1])


def hed_perturb(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) with HED = HED * alpha + beta ((B, 1, 3) each) on tissue pixels."""
    pixels = _pixels(x)
    out = hed_to_rgb(rgb_to_hed(pixels) * alpha + beta)
    return _image(torch.where(tissue_mask(pixels).unsqueeze(-1), out, pixels), x)


def fit_stain_reference(method: str, stain_ref: str | None, shards: Path, fmt: str, train: Source,
                        seed: int) -> dict[str, Any] | None:
    """The reference `--stain-norm` maps onto: a train image id, an image/.npy file, or a seeded train sample."""
    if method == "none":
        return None
    images, what = reference_images(stain_ref, shards, fmt, train, seed)
    fitted = ref.fit_reference(images, method, what, seed)
    logger.info("stain reference (%s) fitted on %s: %s", method, what, fitted)
    return {**fitted, "source": what}


def reference_images(stain_ref: str | None, shards: Path, fmt: str, train: Source,
                     seed: int) -> tuple[np.ndarray, str]:
    """(N, H, W, 3) uint8 images to fit the reference on, and words for them."""
    if stain_ref is None:
        rows = np.sort(np.random.default_rng(seed).choice(len(train), min(REF_SAMPLE, len(train)), replace=False))
        return train.take(rows), f"{len(rows)} train patches sampled with seed {seed}"
    path = Path(stain_ref)
    if path.is_file():
        return read_reference_file(path), f"--stain-ref {stain_ref}"
    everything = open_source(shards, "train", None, fmt)  # any train image, the validation fold's too
    rows = np.flatnonzero(everything.ids.astype(str) == stain_ref)
    if not len(rows):
        raise PcamPrepError(f"--stain-ref {stain_ref}: not a file, and no train image in {shards} has that id")
    return everything.take(rows[:1]), f"--stain-ref {stain_ref} (train image)"


def read_reference_file(path: Path) -> np.ndarray:
    """A .npy ((H, W, 3) or (N, H, W, 3) uint8), .tif/.tiff or .png file as (N, H, W, 3) uint8."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        image = np.load(path, allow_pickle=False)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        image = tifffile.imread(path)
    elif suffix == ".png":
        from matplotlib.image import imread

        image = imread(path)  # PNG: float 0-1
        image = np.round(image * 255).astype(np.uint8) if image.dtype.kind == "f" else image
    else:
        raise PcamPrepError(f"--stain-ref {path}: unknown file type {suffix!r} (use .npy, .tif, .tiff or .png)")
    image = image[..., :3] if image.ndim in (3, 4) and image.shape[-1] == 4 else image  # drop a PNG alpha channel
    if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise PcamPrepError(f"--stain-ref {path}: need uint8 RGB (H, W, 3) or (N, H, W, 3), got "
                            f"{image.dtype} {image.shape}")
    return image[None] if image.ndim == 3 else image
