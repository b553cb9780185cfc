"""`pcam-prep stats`: stain statistics per split (and per train fold), and the figure comparing them.

    rows     = a seeded sample of each split (at most `cap` patches: stats stays fast)
    vectors  = Macenko H and E unit OD vectors of every tissue patch, on its own
    basis    = Macenko on the pooled train sample: one stain basis for every split
    conc     = each tissue pixel's H and E amounts in that basis -> percentiles per split

A train/test stain shift shows as an angle between the splits' mean vectors and as shifted
concentration percentiles; the figure puts each split's per-patch vectors and median
concentrations side by side. Folds of a grouped build (`--groups`, PCam's slides) hold whole
slides, so per-fold numbers are per-slide-group numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import stain
from ..errors import PcamPrepError
from ..figures import figure, save

PERCENTILES = (1, 50, 99)
STAINS = ("H", "E")
STAIN_CAPTIONS = {
    "stain": "Stain per split (Macenko, a seeded sample of tissue patches): each patch's haematoxylin and eosin "
             "optical-density vectors as chromaticities, and its median H and E amounts in one shared basis "
             "(fitted on train). Overlapping clouds: the splits share a stain distribution.",
}
_COLOURS = {"train": "tab:purple", "valid": "tab:green", "test": "tab:orange"}  # test in a colour that shows


@dataclass(frozen=True)
class SplitStain:
    """Per tissue patch of one split's sample: what the figure draws."""

    vectors: np.ndarray  # (P, 2, 3) unit OD vectors [H, E] of patches Macenko could split into two stains
    median_conc: np.ndarray  # (P', 2) median H and E amount of each tissue patch, in the shared basis


def collect_stain(manifest: dict[str, Any], blocks: Sequence[Any], read_rows: Callable[[list, np.ndarray], np.ndarray],
                  cap: int, seed: int) -> tuple[dict[str, Any] | None, dict[str, SplitStain]]:
    """The `stain` object of the stats JSON and the per-split arrays; (None, {}) when cap is 0.

    `read_rows(blocks, rows)` reads global rows of one split's consecutive blocks (collect.read_rows).
    """
    if not cap:
        return None, {}
    images, folds = {}, None
    for k, split in enumerate(manifest["splits"]):
        mine = [b for b in blocks if b.split == split]
        n = sum(len(b) for b in mine)
        rows = np.sort(np.random.default_rng([seed, k]).choice(n, min(cap, n), replace=False))
        images[split] = read_rows(mine, rows)
        if split == "train":
            ends = np.cumsum([f["count"] for f in manifest["folds"]["counts"]])
            folds = np.searchsorted(ends, rows, side="right")  # train rows are ordered by (fold, id)
    return stain_stats(images, folds, cap, seed)


def stain_stats(images: dict[str, np.ndarray], train_folds: np.ndarray | None, cap: int,
                seed: int) -> tuple[dict[str, Any], dict[str, SplitStain]]:
    """Stain vectors and concentration percentiles of each split's sampled `images` (and of each train fold)."""
    basis, basis_from = shared_basis(images.get("train"), seed)
    summary: dict[str, Any] = {
        "method": "macenko", "sample_per_split": cap, "seed": seed, "tissue_rule": _TISSUE_RULE,
        "basis": {"from": basis_from, **dict(zip(STAINS, basis.tolist()))}, "splits": {}}
    arrays = {}
    for split, sample in images.items():
        patches = measure(sample, basis)
        summary["splits"][split], arrays[split] = describe(patches)
        if split == "train" and train_folds is not None:
            summary["train_folds"] = {str(f): describe([p for p, k in zip(patches, train_folds) if k == f])[0]
                                      for f in np.unique(train_folds).tolist()}
    train = summary["splits"].get("train")
    for split, part in summary["splits"].items():
        if split != "train" and train is not None:
            part["angle_to_train_deg"] = {s: _angle(part[s], train[s]) for s in STAINS}
    return summary, arrays


_TISSUE_RULE = (f"pixels with HSV saturation >= {stain.TISSUE_SATURATION}, brightest channel >= 30/255 and "
                f"summed optical density >= {stain.MIN_OD}; a tissue patch has >= {stain.MIN_TISSUE_SHARE:.0%} of them")


def shared_basis(train: np.ndarray | None, seed: int) -> tuple[np.ndarray, str]:
    """(2, 3) stain vectors every split's concentrations are measured in: train's pooled Macenko fit."""
    if train is not None and len(train):
        try:
            return np.array(stain.fit_reference(train, "macenko", "train", seed)["stains"]), "train sample (Macenko)"
        except PcamPrepError:
            pass  # no (two-stain) tissue in the train sample: fall back to the textbook vectors
    ruifrok = stain.RGB_FROM_HED[:2]
    return ruifrok / np.linalg.norm(ruifrok, axis=1, keepdims=True), "Ruifrok & Johnston H and E (rgb2hed)"


@dataclass(frozen=True)
class _Patch:
    tissue: bool
    vectors: np.ndarray | None  # (2, 3) its own Macenko stain vectors, None when not two stains
    conc: np.ndarray  # (P, 2) H and E amounts of its tissue pixels in the shared basis


def measure(images: np.ndarray, basis: np.ndarray) -> list[_Patch]:
    """Each sampled patch, measured once (per split and per fold summaries reuse it)."""
    if not len(images):
        return []
    pixels = stain.tissue_pixels(images)
    patches = []
    for image, mask, tissue in zip(images, pixels, stain.has_tissue(images, pixels)):
        if not tissue:
            patches.append(_Patch(False, None, np.zeros((0, 2))))
            continue
        od = stain.optical_density(image[mask])
        patches.append(_Patch(True, stain.macenko_stains(od), stain.concentrations(od, basis)))
    return patches


def describe(patches: list[_Patch]) -> tuple[dict[str, Any], SplitStain]:
    """One sample's JSON facts (counts, mean vectors, percentiles) and its per-patch arrays."""
    vectors = np.array([p.vectors for p in patches if p.vectors is not None]).reshape(-1, 2, 3)
    conc = [p.conc for p in patches if p.tissue]
    facts: dict[str, Any] = {"patches": len(patches), "tissue_patches": len(conc), "two_stain_patches": len(vectors)}
    mean = vectors.mean(0) if len(vectors) else None
    for k, s in enumerate(STAINS):
        facts[s] = None if mean is None else [round(float(v), 4) for v in mean[k] / np.linalg.norm(mean[k])]
    facts["concentration_percentiles"] = None
    if conc:
        every = np.concatenate(conc)
        facts["concentration_percentiles"] = {
            s: {f"p{q}": round(float(v), 4) for q, v in zip(PERCENTILES, np.percentile(every[:, i], PERCENTILES))}
            for i, s in enumerate(STAINS)}
    medians = np.array([np.median(c, axis=0) for c in conc]).reshape(-1, 2)
    return facts, SplitStain(vectors, medians)


def _angle(a: list[float] | None, b: list[float] | None) -> float | None:
    if a is None or b is None:
        return None
    return round(float(np.degrees(np.arccos(np.clip(np.dot(a, b), -1, 1)))), 2)


def plot_stain(summary: dict[str, Any], arrays: dict[str, SplitStain], path: Path) -> Path:
    """Left: per-patch H and E vectors as OD chromaticities per split; right: median H vs E amount per patch."""
    fig = figure(11, 4.4)
    chroma, amounts = fig.subplots(1, 2)
    for split, part in arrays.items():
        colour = _COLOURS.get(split, "tab:brown")
        facts = summary["splits"][split]
        for k, (name, marker) in enumerate(zip(STAINS, "o^")):
            if len(part.vectors):
                xy = _chromaticity(part.vectors[:, k])
                chroma.scatter(xy[:, 0], xy[:, 1], s=9, marker=marker, alpha=0.35, color=colour, linewidths=0)
            if facts[name] is not None:
                mean = _chromaticity(np.array([facts[name]]))[0]
                chroma.scatter(*mean, s=90, marker=marker, color=colour, edgecolors="black",
                               label=f"{split} {name} (mean of {facts['two_stain_patches']})")
        if len(part.median_conc):
            amounts.scatter(part.median_conc[:, 0], part.median_conc[:, 1], s=10, alpha=0.5, color=colour,
                            linewidths=0, label=f"{split}: {len(part.median_conc)} tissue patches")
    chroma.set(title="stain vectors per patch (o haematoxylin, ^ eosin)", xlabel="red share of optical density",
               ylabel="green share of optical density")
    chroma.legend(fontsize=7, loc="best")
    basis = summary["basis"]["from"]
    amounts.set(title="median stain amount per patch", xlabel=f"haematoxylin (basis: {basis})", ylabel="eosin")
    medians = [p.median_conc for p in arrays.values() if len(p.median_conc)]
    if medians:
        lo, hi = np.percentile(np.concatenate(medians), [0.5, 99.5], axis=0)  # a stray patch does not squash the rest
        pad = 0.1 * (hi - lo) + 1e-3
        amounts.set(xlim=(lo[0] - pad[0], hi[0] + pad[0]), ylim=(lo[1] - pad[1], hi[1] + pad[1]))
        amounts.legend(fontsize=8, loc="best")
    angles = [f"{split}: H {p['angle_to_train_deg']['H']}°, E {p['angle_to_train_deg']['E']}°"
              for split, p in summary["splits"].items() if "angle_to_train_deg" in p]
    if angles:
        fig.suptitle("mean stain vector angle to train  " + "; ".join(angles), fontsize=9)
    return save(fig, path)


def _chromaticity(vectors: np.ndarray) -> np.ndarray:
    """(N, 3) OD vectors -> (N, 2) red and green shares of their sum."""
    return vectors[:, :2] / vectors.sum(1, keepdims=True)
