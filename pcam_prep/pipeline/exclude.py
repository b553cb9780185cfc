"""`build --exclude ids.csv`: leave out train images a person decided against (e.g. confirmed rows of cv's
label_review.csv). They leave the train split and its moments like dedup's drops, and the manifest
records how many, from which file."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import PcamPrepError
from ..files import sha256_file
from .dedup import Dedup


def read_exclude(path: Path) -> set[str]:
    """The `id` column of a CSV (any other columns, like label_review.csv's, are ignored)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PcamPrepError(f"--exclude {path}: cannot read it as CSV ({exc})") from None
    if "id" not in frame.columns:
        raise PcamPrepError(f"--exclude {path}: expected an id column, found {list(frame.columns)}")
    return set(frame["id"])


def apply_exclude(result: Dedup, path: Path | None) -> tuple[Dedup, dict[str, Any]]:
    """`result` without the listed train ids, and the manifest's `excluded` record."""
    if path is None:
        return result, {"count": 0, "listed": 0, "file": None, "sha256": None}
    ids = read_exclude(path)
    train = result.train
    drop = train["id"].isin(ids).to_numpy()
    kept = {**result.kept, "train": train[~drop]}
    dropped = pd.concat([result.dropped, train[drop]], ignore_index=True)
    record = {"count": int(drop.sum()), "listed": len(ids), "file": str(path), "sha256": sha256_file(path)}
    return dataclasses.replace(result, kept=kept, dropped=dropped), record
