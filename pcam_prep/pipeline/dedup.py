"""Duplicate groups by pixel content, and leakage from train into the held-out splits.

Policy: exact copies within train keep one (the smallest id; the first row when ids are
equal, as PCam's sha1 ids are); copies whose labels disagree are all dropped, since no one
of them can be trusted; a train image that also appears in a held-out split (Kaggle test,
PCam valid/test) is dropped from train and reported as leakage (`train-<split>`). Held-out
splits keep every id (the Kaggle submission needs them all); only rows repeating an id already
in their split are dropped (PCam: the same patch twice), as `exact`, so ids stay unique. Different
ids with the same pixels inside a held-out split (re-saved copies) are kept and reported as
`<split>-duplicate`: the first id under `kept`, the other copy, kept too, under `dropped`.

Optionally (`near_duplicates`), the same policy runs once more over a dihedral-invariant
digest: a patch that equals another after a flip or a 90-degree rotation (the 8 symmetries of
the square, which all keep the centre 32x32 window and so the label) is a `dihedral` copy;
disagreeing labels make `dihedral-conflicting-label`, a rotated copy of a held-out image
`dihedral-train-<split>` leakage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..schema import SplitSpec

DUPLICATE_COLUMNS = ["kept", "dropped", "kind"]
DIHEDRAL = "dihedral"  # prefix of the near-duplicate kinds: dihedral, dihedral-conflicting-label, dihedral-train-test
KEPT_SUFFIX = "-duplicate"  # <split>-duplicate: copies inside a held-out split, reported but both kept


def is_kept_kind(kind: str) -> bool:
    return kind.endswith(KEPT_SUFFIX)


@dataclass(frozen=True)
class Dedup:
    kept: dict[str, pd.DataFrame]  # per split, the kept rows, same columns as the input
    duplicates: pd.DataFrame  # kept, dropped, kind
    dropped: pd.DataFrame  # the train rows removed (their pixels leave the train moments)
    leaked: dict[str, int]  # per held-out split: its images whose pixels also occur in train

    @property
    def train(self) -> pd.DataFrame:
        return self.kept["train"]

    @property
    def leaked_test(self) -> int:
        return self.leaked.get("test", 0)


def dedup(splits: dict[str, pd.DataFrame], specs: tuple[SplitSpec, ...], key: str = "digest",
          prefix: str = "") -> Dedup:
    """Every frame needs id, `key` (the pixel digest); labelled ones label. Returns the kept rows of every split.

    `key`/`prefix` rerun the same policy on another digest, e.g. ("dihedral", "dihedral-").
    """
    train = splits["train"].sort_values("id", kind="stable")
    rows: list[pd.DataFrame] = []
    group = train.groupby(key, sort=False)
    size = group["id"].transform("size")
    n_labels = group["label"].transform("nunique")
    conflicting = (size > 1) & (n_labels > 1)
    rows.append(pd.DataFrame({"kept": "", "dropped": train.loc[conflicting, "id"],
                              "kind": f"{prefix}conflicting-label"}))
    copies = train[(size > 1) & ~conflicting]
    first = copies.groupby(key, sort=False)["id"].transform("first")
    extra = copies.groupby(key, sort=False).cumcount() > 0
    rows.append(pd.DataFrame({"kept": first[extra], "dropped": copies.loc[extra, "id"],
                              "kind": prefix.rstrip("-") or "exact"}))
    kept = train[~conflicting].drop(index=copies.index[extra])
    dropped = [train[conflicting], copies[extra]]

    held, leaked_counts = {}, {}
    for spec in (s for s in specs if not s.folded):
        frame = splits[spec.name]
        repeat = frame.duplicated("id")
        repeated = frame.loc[repeat, "id"]
        rows.append(pd.DataFrame({"kept": repeated, "dropped": repeated, "kind": "exact"}))
        held[spec.name] = frame = frame[~repeat].reset_index(drop=True)
        by_id = frame.sort_values("id", kind="stable")
        copy = by_id.duplicated(key)
        first_id = by_id[~copy].set_index(key)["id"]
        rows.append(pd.DataFrame({"kept": by_id.loc[copy, key].map(first_id), "dropped": by_id.loc[copy, "id"],
                                  "kind": f"{prefix}{spec.name}{KEPT_SUFFIX}"}))
        leaked = kept[key].isin(first_id.index)
        rows.append(pd.DataFrame({"kept": kept.loc[leaked, key].map(first_id), "dropped": kept.loc[leaked, "id"],
                                  "kind": f"{prefix}train-{spec.name}"}))
        dropped.append(kept[leaked])
        kept = kept[~leaked]
        leaked_counts[spec.name] = int(frame[key].isin(train[key]).sum())
    duplicates = pd.concat(rows, ignore_index=True)[DUPLICATE_COLUMNS]
    duplicates = duplicates.sort_values(["kind", "dropped"], kind="stable", ignore_index=True)
    return Dedup({"train": kept.reset_index(drop=True), **held}, duplicates, pd.concat(dropped), leaked_counts)


def dedup_dihedral(exact: Dedup, dihedral: dict[str, pd.Series], specs: tuple[SplitSpec, ...]) -> Dedup:
    """`exact`'s result, then the same policy over dihedral digests (split -> Series id -> digest).

    Leakage counts stay the exact ones; rotated leaks show up in the duplicates table.
    """
    frames = {name: frame.assign(dihedral=frame["id"].map(dihedral[name])) for name, frame in exact.kept.items()}
    near = dedup(frames, specs, key="dihedral", prefix=f"{DIHEDRAL}-")
    near_rows = near.duplicates[near.duplicates["kind"].str.startswith(DIHEDRAL)]  # held-out repeats: done already
    duplicates = pd.concat([exact.duplicates, near_rows], ignore_index=True)
    duplicates = duplicates.drop_duplicates(["kept", "dropped"], keep="first")  # exact held-out copies: once
    duplicates = duplicates.sort_values(["kind", "dropped"], kind="stable", ignore_index=True)
    kept = {name: frame.drop(columns="dihedral") for name, frame in near.kept.items()}
    dropped = pd.concat([exact.dropped, near.dropped.drop(columns="dihedral")])
    return Dedup(kept, duplicates, dropped, exact.leaked)


def _views(image: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral transforms of an (H, W, C) image, as views."""
    flips = (image, image[:, ::-1], image[::-1], image[::-1, ::-1])
    return [*flips, *(f.transpose(1, 0, 2) for f in flips)]


def dihedral_digest(image: np.ndarray) -> str:
    """sha1 of the lexicographically smallest of the image's 8 dihedral transforms.

    Equal for any two images that are flips/rotations of each other. The smallest transform
    is found by its first row (288 bytes at 96x96); only rows that tie (symmetric or flat
    borders) are compared whole, so the cost is about one extra copy and one sha1.
    """
    views = _views(image)
    firsts = [v[0].tobytes() for v in views]
    low = min(firsts)
    tied = [v for v, first in zip(views, firsts) if first == low]
    best = tied[0] if len(tied) == 1 else min(tied, key=lambda v: v.tobytes())
    return hashlib.sha1(np.ascontiguousarray(best).data).hexdigest()


def dihedral_digests(rows, shape: tuple[int, int, int], block_rows: int = 512) -> list[str]:
    """Dihedral digests of every image of a write-stage source (write.Files and friends), in order."""
    return [dihedral_digest(image) for _, images in rows.blocks(shape, block_rows) for image in images]
