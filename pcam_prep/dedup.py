"""Duplicate groups by pixel content, and train/test leakage.

Policy: exact copies within train keep one (the smallest id); copies whose labels disagree
are all dropped, since no one of them can be trusted; a train image that also appears in
test is dropped from train (test must keep every id for the submission) and reported as
leakage. Test duplicates among themselves are kept: every test id needs a prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

DUPLICATE_COLUMNS = ["kept", "dropped", "kind"]
KINDS = ("exact", "conflicting-label", "train-test")


@dataclass(frozen=True)
class Dedup:
    train: pd.DataFrame  # the kept train rows, same columns as the input
    duplicates: pd.DataFrame  # kept, dropped, kind
    leaked_test: int  # test images whose pixels also occur in train


def dedup(train: pd.DataFrame, test: pd.DataFrame) -> Dedup:
    """`train` needs id, label, digest; `test` needs id, digest. Returns kept train rows."""
    train = train.sort_values("id", kind="stable")
    rows: list[pd.DataFrame] = []
    group = train.groupby("digest", sort=False)
    size = group["id"].transform("size")
    n_labels = group["label"].transform("nunique")
    conflicting = (size > 1) & (n_labels > 1)
    rows.append(pd.DataFrame({"kept": "", "dropped": train.loc[conflicting, "id"], "kind": "conflicting-label"}))
    copies = train[(size > 1) & ~conflicting]
    first = copies.groupby("digest", sort=False)["id"].transform("first")
    extra = copies["id"] != first
    rows.append(pd.DataFrame({"kept": first[extra], "dropped": copies.loc[extra, "id"], "kind": "exact"}))
    kept = train[~conflicting].drop(index=copies.index[extra])

    test_first = test.sort_values("id", kind="stable").drop_duplicates("digest").set_index("digest")["id"]
    leaked = kept["digest"].isin(test_first.index)
    rows.append(pd.DataFrame({
        "kept": kept.loc[leaked, "digest"].map(test_first), "dropped": kept.loc[leaked, "id"], "kind": "train-test",
    }))
    leaked_test = int(test["digest"].isin(train["digest"]).sum())
    duplicates = pd.concat(rows, ignore_index=True)[DUPLICATE_COLUMNS]
    duplicates = duplicates.sort_values(["kind", "dropped"], kind="stable", ignore_index=True)
    return Dedup(kept[~leaked].reset_index(drop=True), duplicates, leaked_test)
