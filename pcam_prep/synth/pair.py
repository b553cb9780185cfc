"""A PCam folder and a Kaggle folder cut from the same patches, as the competition data was cut from PCam.

OUT/pcam is `write_pcam_h5`'s folder (with its deliberate repeats); OUT/kaggle holds each distinct
PCam patch once (Kaggle dropped PCam's duplicates), PCam train and valid as Kaggle train and PCam
test as Kaggle test, minus a few patches left out on purpose, plus a few patches of its own that
are in no PCam file. Ids are the sha1 of the pixels on both sides, so `pcam-prep map` can match them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..files import file_stamp
from ..progress import Counter, ProgressFn
from ..schema import image_shape
from ..sources import pcam_h5
from .kaggle import make_patch, write_labels, write_tif
from .pcam import PcamSynthSummary, write_pcam_h5

logger = logging.getLogger(__name__)

PCAM_DIR, KAGGLE_DIR = "pcam", "kaggle"
KAGGLE_SPLIT_OF = {"train": "train", "valid": "train", "test": "test"}  # PCam split -> the Kaggle split it feeds
_PAIR_STREAM = 0x9A17  # drops and extra patches draw from their own stream: the PCam files stay as write_pcam_h5's
_BLOCK = 256


@dataclass(frozen=True)
class PairSummary:
    """What `write_pair` wrote; the counts a correct `pcam-prep map` of the two folders must report."""

    out: Path
    pcam: PcamSynthSummary
    kaggle: dict[str, int]  # ids per Kaggle split, the unmatched ones included
    dropped: int  # distinct PCam patches left out of Kaggle on purpose
    dropped_rows: int  # the PCam rows that hold them (a left-out patch may sit in several rows)
    unmatched: dict[str, int]  # Kaggle ids per split whose pixels are in no PCam row


def write_pair(out: Path, n_train: int, n_valid: int, n_test: int, *, size: int = 96, seed: int = 0,
               share: float = 0.02, progress: ProgressFn | None = None) -> PairSummary:
    """Write OUT/pcam and OUT/kaggle (see the module docstring); the same arguments give the same bytes.

    round(share * n) (at least one) distinct patches are left out of Kaggle, and as many fresh
    patches are added to each non-empty Kaggle split.
    """
    if not 0.0 <= share <= 0.5:
        raise ValueError(f"share must be in [0, 0.5], got {share!r}")
    out = Path(out)
    pcam = write_pcam_h5(out / PCAM_DIR, n_train, n_valid, n_test, size=size, seed=seed, progress=progress)
    inventory = pcam_h5.scan(pcam_h5.resolve_layout(out / PCAM_DIR), image_shape(size))
    every = _digests(inventory.splits)
    patches = every.drop_duplicates("digest", ignore_index=True)  # the first PCam row of every distinct patch
    rng = np.random.default_rng([seed, _PAIR_STREAM])
    dropped = rng.choice(len(patches), _few(len(patches), share), replace=False)
    kept = patches.drop(index=patches.index[dropped])
    left_out = int((~every["digest"].isin(kept["digest"])).sum())
    counter = Counter(progress, "kaggle", len(kept))
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for folder in rows:
        (out / KAGGLE_DIR / folder).mkdir(parents=True, exist_ok=True)
    for split, frame in kept.groupby("pcam_split", sort=False):
        rows[KAGGLE_SPLIT_OF[split]] += _write_rows(out / KAGGLE_DIR / KAGGLE_SPLIT_OF[split], frame, counter)
    known, unmatched = set(patches["digest"]), {}
    for split, extra_rng in zip(rows, rng.spawn(2)):
        extras = _write_extras(out / KAGGLE_DIR / split, extra_rng, _few(len(rows[split]), share), size, known)
        rows[split] += extras
        unmatched[split] = len(extras)
    write_labels(out / KAGGLE_DIR / "train_labels.csv", rows["train"])
    write_labels(out / KAGGLE_DIR / "sample_submission.csv", [(i, 0) for i, _ in rows["test"]])
    logger.info("wrote a PCam/Kaggle pair to %s: %d patches left out, %s unmatched", out, len(dropped), unmatched)
    return PairSummary(out, pcam, {s: len(r) for s, r in rows.items()}, len(dropped), left_out, unmatched)


def _few(n: int, share: float) -> int:
    return max(1, int(round(n * share))) if n else 0


def _digests(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every PCam row with its pixel sha1: digest, pcam_split, path, row, label; in PCam order."""
    frames = []
    for split, frame in splits.items():
        digests = [hashlib.sha1(image.data).hexdigest() for _, images in _blocks(frame) for image in images]
        frames.append(frame.assign(digest=digests, pcam_split=split))
    return pd.concat(frames, ignore_index=True)


def _blocks(frame: pd.DataFrame):
    """(rows, images) of `frame`'s PCam rows, `_BLOCK` at a time (one x file per frame)."""
    if frame.empty:
        return
    path, stamp = str(frame["path"].iloc[0]), file_stamp(frame["path"].iloc[0])
    index = frame["row"].to_numpy(np.int64)
    for start in range(0, len(index), _BLOCK):
        yield start, pcam_h5.read_rows(path, index[start : start + _BLOCK], stamp)


def _write_rows(folder: Path, frame: pd.DataFrame, counter: Counter) -> list[tuple[str, int]]:
    ids, labels = frame["digest"].tolist(), frame["label"].astype(int).tolist()
    for start, images in _blocks(frame):
        for sample_id, image in zip(ids[start : start + len(images)], images):
            write_tif(folder, image, sample_id)
        counter.add(len(images))
    return list(zip(ids, labels))


def _write_extras(folder: Path, rng: np.random.Generator, n: int, size: int, known: set[str]) -> list[tuple[str, int]]:
    """n fresh patches, none of them a PCam patch."""
    written = []
    for label in rng.integers(0, 2, n).tolist():
        image, _ = make_patch(rng, label, size)
        sample_id = hashlib.sha1(image.tobytes()).hexdigest()
        if sample_id in known:  # practically impossible; then it simply is not an extra
            continue
        write_tif(folder, image, sample_id)
        written.append((sample_id, label))
    return written
