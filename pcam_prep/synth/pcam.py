"""Synthetic patches in the official PatchCamelyon HDF5 layout (the Kaggle layout is synth.write_kaggle).

Writes camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 and _meta.csv, with the
patches of synth.make_patch. Like the real files, these hold duplicates: the last two train
rows repeat the first two (exact duplicates) and the first valid row is train row 2 (leakage),
so a build has something to report.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..files import tmp_path
from ..progress import Counter, ProgressFn
from ..sources.pcam_h5 import META_GROUP, X_KEY, Y_KEY, pcam_file
from .kaggle import make_patch

logger = logging.getLogger(__name__)

_SLIDES = {"train": 6, "valid": 3, "test": 3}  # a handful of fake whole-slide images per split
_CHUNK_ROWS = 32  # x is chunked (unfiltered), so readers must cope with chunks
_BLOCK = 256  # rows generated, written and reported at a time


@dataclass(frozen=True)
class PcamSynthSummary:
    out: Path
    counts: dict[str, int]  # rows per split, duplicates included
    positives: dict[str, int]
    duplicates: int  # rows that repeat an earlier row (within train, or train -> valid)


def write_pcam_h5(out: Path, n_train: int, n_valid: int, n_test: int, *, size: int = 96, seed: int = 0,
                  positive_fraction: float = 0.405,
                  progress: ProgressFn | None = None) -> PcamSynthSummary:
    """Write a synthetic PCam folder under `out`; the same arguments give byte-identical files.

    A split's file holds exactly n rows, deliberate duplicates included (train: rows n-1, n-2
    copy rows 0, 1 when n >= 4; valid: row 0 copies train row 2 when n_train >= 5).
    A split with n = 0 is not written. `progress("synth", done, total)` after each block of rows.
    """
    counts = {"train": n_train, "valid": n_valid, "test": n_test}
    for name, val in (*((f"n_{k}", v) for k, v in counts.items()), ("size", size)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < (32 if name == "size" else 0):
            raise ValueError(f"{name} must be an integer >= {32 if name == 'size' else 0}, got {val!r}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    copies = {"train": {n_train - 1: ("train", 0), n_train - 2: ("train", 1)} if n_train >= 4 else {},
              "valid": {0: ("train", 2)} if n_valid >= 1 and n_train >= 5 else {}, "test": {}}
    counter = Counter(progress, "synth", sum(counts.values()))
    kept: dict[tuple[str, int], tuple[np.ndarray, int, bool]] = {}  # rows that get copied: (image, label, tumour)
    positives = {}
    for (split, n), rng in zip(counts.items(), np.random.default_rng(seed).spawn(3)):
        if n == 0:
            continue
        labels = np.zeros(n, np.uint8)
        labels[: round(n * positive_fraction)] = 1
        label_rng, image_rng, meta_rng = rng.spawn(3)
        labels = label_rng.permutation(labels)
        wanted = {row for c in copies.values() for src, row in c.values() if src == split}
        labels, tumour = _write_x(out / pcam_file(split, X_KEY), image_rng, labels, size, copies[split], kept,
                                  split, wanted, counter)
        _write_h5(out / pcam_file(split, Y_KEY), Y_KEY, labels.reshape(n, 1, 1, 1))
        _write_meta(out / pcam_file(split, "meta", "csv"), meta_rng, split, labels, tumour, size, copies[split])
        positives[split] = int(labels.sum())
    logger.info("wrote PCam-layout synthetic data to %s: %s", out, counts)
    return PcamSynthSummary(out, counts, positives, sum(len(c) for c in copies.values()))


def _write_x(path: Path, rng: np.random.Generator, labels: np.ndarray, size: int, copies: dict, kept: dict,
             split: str, wanted: set[int], counter: Counter) -> tuple[np.ndarray, np.ndarray]:
    """Generate and write x block by block; return the labels (copies take their source's) and tumour flags."""
    import h5py

    n, labels, tumour, seen = len(labels), labels.copy(), np.zeros(len(labels), bool), set()
    tmp = tmp_path(path)
    with h5py.File(tmp, "w", libver=("v110", "v110"), track_order=False) as fh:
        x = fh.create_dataset(X_KEY, shape=(n, size, size, 3), dtype=np.uint8,
                              chunks=(min(n, _CHUNK_ROWS), size, size, 3), track_times=False)
        block = np.empty((_BLOCK, size, size, 3), np.uint8)
        for start in range(0, n, _BLOCK):
            stop = min(start + _BLOCK, n)
            for i in range(start, stop):
                if i in copies:
                    block[i - start], labels[i], tumour[i] = kept[copies[i]]
                    continue
                img, mask = make_patch(rng, int(labels[i]), size)
                while (digest := hashlib.sha1(img.tobytes()).hexdigest()) in seen:  # practically impossible
                    img, mask = make_patch(rng, int(labels[i]), size)
                seen.add(digest)
                block[i - start], tumour[i] = img, mask.any()
                if i in wanted:
                    kept[(split, i)] = (img, int(labels[i]), bool(tumour[i]))
            x[start:stop] = block[: stop - start]
            counter.add(stop - start)
    os.replace(tmp, path)
    return labels, tumour


def _write_h5(path: Path, key: str, data: np.ndarray) -> None:
    import h5py

    tmp = tmp_path(path)
    with h5py.File(tmp, "w", libver=("v110", "v110"), track_order=False) as fh:
        fh.create_dataset(key, data=data, track_times=False)
    os.replace(tmp, path)


def _write_meta(path: Path, rng: np.random.Generator, split: str, labels: np.ndarray, tumour: np.ndarray,
                size: int, copies: dict) -> None:
    """PCam's meta columns, with an unnamed index column first as pandas wrote the originals."""
    n = len(labels)
    k = min(_SLIDES[split], n)
    slides = np.array([f"synth_{split}_{i:03d}" for i in range(k)])[rng.integers(0, k, n)]
    coords = rng.integers(0, 1000, (n, 2)) * size
    for row, (src_split, src_row) in copies.items():
        if src_split == split:  # a duplicate is the same patch of the same slide
            slides[row], coords[row] = slides[src_row], coords[src_row]
    meta = pd.DataFrame({
        "coord_y": coords[:, 0], "coord_x": coords[:, 1],
        "tumor_patch": tumour | labels.astype(bool), "center_tumor_patch": labels.astype(bool), META_GROUP: slides,
    })
    tmp = tmp_path(path)
    meta.to_csv(tmp, lineterminator="\n")
    os.replace(tmp, path)
