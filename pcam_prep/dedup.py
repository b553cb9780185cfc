"""Duplicate groups by pixel content, and leakage from train into the held-out splits.

Policy: exact copies within train keep one (the smallest id; the first row when ids are
equal, as PCam's sha1 ids are); copies whose labels disagree are all dropped, since no one
of them can be trusted; a train image that also appears in a held-out split (Kaggle test,
PCam valid/test) is dropped from train and reported as leakage (`train-<split>`). Held-out
splits keep every id (the Kaggle submission needs them all); only rows repeating an id already
in their split are dropped (PCam: the same patch twice), as `exact`, so ids stay unique.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .schema import SplitSpec

DUPLICATE_COLUMNS = ["kept", "dropped", "kind"]
KINDS = ("exact", "conflicting-label", "train-test", "train-valid")  # leakage: "train-" + held-out split


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


def dedup(splits: dict[str, pd.DataFrame], specs: tuple[SplitSpec, ...]) -> Dedup:
    """Every frame needs id, digest; labelled ones label. Returns the kept rows of every split."""
    train = splits["train"].sort_values("id", kind="stable")
    rows: list[pd.DataFrame] = []
    group = train.groupby("digest", sort=False)
    size = group["id"].transform("size")
    n_labels = group["label"].transform("nunique")
    conflicting = (size > 1) & (n_labels > 1)
    rows.append(pd.DataFrame({"kept": "", "dropped": train.loc[conflicting, "id"], "kind": "conflicting-label"}))
    copies = train[(size > 1) & ~conflicting]
    first = copies.groupby("digest", sort=False)["id"].transform("first")
    extra = copies.groupby("digest", sort=False).cumcount() > 0
    rows.append(pd.DataFrame({"kept": first[extra], "dropped": copies.loc[extra, "id"], "kind": "exact"}))
    kept = train[~conflicting].drop(index=copies.index[extra])
    dropped = [train[conflicting], copies[extra]]

    held, leaked_counts = {}, {}
    for spec in (s for s in specs if not s.folded):
        frame = splits[spec.name]
        repeat = frame.duplicated("id")
        repeated = frame.loc[repeat, "id"]
        rows.append(pd.DataFrame({"kept": repeated, "dropped": repeated, "kind": "exact"}))
        held[spec.name] = frame = frame[~repeat].reset_index(drop=True)
        first_id = frame.sort_values("id", kind="stable").drop_duplicates("digest").set_index("digest")["id"]
        leaked = kept["digest"].isin(first_id.index)
        rows.append(pd.DataFrame({"kept": kept.loc[leaked, "digest"].map(first_id), "dropped": kept.loc[leaked, "id"],
                                  "kind": f"train-{spec.name}"}))
        dropped.append(kept[leaked])
        kept = kept[~leaked]
        leaked_counts[spec.name] = int(frame["digest"].isin(train["digest"]).sum())
    duplicates = pd.concat(rows, ignore_index=True)[DUPLICATE_COLUMNS]
    duplicates = duplicates.sort_values(["kind", "dropped"], kind="stable", ignore_index=True)
    return Dedup({"train": kept.reset_index(drop=True), **held}, duplicates, pd.concat(dropped), leaked_counts)
