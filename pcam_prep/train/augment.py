"""Augmentation as batched tensor ops on the device: dihedral transforms and a light colour jitter.

Inputs are float (B, 3, H, W) batches on 0-1 scale, before normalisation. Randomness comes only
from the `torch.Generator` passed in (on the batch's device), so a saved generator state replays
the same augmentations. Every dihedral transform maps the centre 32x32 window onto itself, so
labels are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

N_DIHEDRAL = 8
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights


@dataclass(frozen=True)
class Jitter:
    brightness: float = 0.08  # per-sample gain 1 +- this
    contrast: float = 0.10  # per-sample contrast about the image mean 1 +- this
    saturation: float = 0.10  # per-sample blend towards/away from grey 1 +- this
    stain: float = 0.04  # per-sample, per-channel gain 1 +- this (stain intensity differences)


def dihedral_codes(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random transform code in 0..7 per sample."""
    return torch.randint(0, N_DIHEDRAL, (x.shape[0],), generator=generator, device=x.device)


def dihedral(x: torch.Tensor, codes: torch.Tensor | int) -> torch.Tensor:
    """Apply dihedral transform `codes` (one int for the batch, or one per sample) to (B, C, H, W).

    Code bits: 1 flips left-right, 2 flips up-down, 4 transposes. So codes 0..1 are
    {identity, h-flip}, 0..3 add v-flip and rot180, 0..7 the whole group: TTA with the first
    1, 2, 4 or 8 codes uses a subgroup-like spread of views.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral transforms need square images, got {tuple(x.shape[-2:])}")
    if isinstance(codes, int):
        if not 0 <= codes < N_DIHEDRAL:
            raise ValueError(f"dihedral code must be in 0..7, got {codes}")
        x = x.transpose(2, 3) if codes & 4 else x
        x = x.flip(2) if codes & 2 else x
        return x.flip(3) if codes & 1 else x
    bit = [((codes & b) != 0).view(-1, 1, 1, 1) for b in (4, 2, 1)]
    x = torch.where(bit[0], x.transpose(2, 3), x)
    x = torch.where(bit[1], x.flip(2), x)
    return torch.where(bit[2], x.flip(3), x)


def colour_jitter(x: torch.Tensor, generator: torch.Generator, jitter: Jitter = Jitter()) -> torch.Tensor:
    """Per-sample stain gain, saturation, contrast and brightness on 0-1 images, clamped to 0-1."""
    b = x.shape[0]
    u = torch.rand((b, 6), generator=generator, device=x.device, dtype=x.dtype) * 2 - 1  # uniform -1..1
    stain = 1 + jitter.stain * u[:, 0:3].view(b, 3, 1, 1)
    saturation, contrast, brightness = (1 + s * u[:, i].view(b, 1, 1, 1) for i, s in
                                        ((3, jitter.saturation), (4, jitter.contrast), (5, jitter.brightness)))
    x = x * stain
    grey = sum(w * x[:, c : c + 1] for c, w in enumerate(_GREY))  # no per-step host->device tensor (a sync)
    x = grey + (x - grey) * saturation
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * contrast
    return (x * brightness).clamp_(0, 1)


def augment(x: torch.Tensor, generator: torch.Generator, jitter: Jitter = Jitter()) -> torch.Tensor:
    """A random dihedral transform and colour jitter per sample."""
    return colour_jitter(dihedral(x, dihedral_codes(x, generator)), generator, jitter)
