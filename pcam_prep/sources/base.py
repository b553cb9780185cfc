"""What every source layout hands the pipeline: rows to inspect per split, and how to read them.

A layout (Kaggle tif folders, PCam HDF5 files) scans its inputs into an `Inventory` without
touching pixels. Its `RowReader` then says how a batch of rows is inspected (decoded, checked,
fingerprinted) and how the write stage reads kept rows again. Readers hold no open files:
everything they hand to a task is paths and plain values.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from ..qc import FLAGS
from ..schema import RowSource, SplitSpec

REJECT_COLUMNS = ["id", "path", "reason", "detail", "split"]  # split: where the input was meant to go

# Every reason a file can be rejected for, with the words rejects.csv users will read.
REASONS = {
    "empty": "zero-byte file",
    "not-tiff": "not a TIFF file",
    "unreadable": "corrupt or unsupported TIFF",
    "truncated": "file shorter than its pixel data",
    "too-large": "file or header larger than any patch could be",
    "multi-page": "more than one image in the file",
    "bad-shape": "wrong height/width",
    "bad-channels": "not 3-channel RGB",
    "bad-dtype": "not 8-bit",
    "blank": "all-black or all-white patch",
    "no-label": "no row in the labels CSV",
    "bad-label": "label is not 0 or 1",
    "bad-id": "id is not a plain file name",
    "missing-file": "labels row whose file does not exist",
    "stray-file": "not a .tif file",
    "not-regular": "symbolic link, folder or device where a file was expected (never followed)",
    "io-error": "could not be read from disk",
    **{flag: f"QC flag (only with --drop-flags): {rule}" for flag, rule in FLAGS.items()},
}


class RowReader(Protocol):
    """How a layout's rows are inspected, located for rejects.csv, and handed to the write stage."""

    ids_from_pixels: bool  # True: a row's id is the sha1 of its pixels, known only after inspection
    held_columns: tuple[str, ...]  # frame columns that rows() copies into its RowSource (droppable once it exists)

    def inspect_call(self, rows: pd.DataFrame, shape: tuple[int, int, int], keep_blank: bool,
                     with_moments: bool) -> tuple[Callable[..., Any], tuple]:
        """(function, args) that inspect `rows` in one task and return a validate.BatchReport."""

    def locate(self, rows: pd.DataFrame, root: Path) -> list[str]:
        """Where each row came from, relative to `root`, for rejects.csv."""

    def rows(self, frame: pd.DataFrame) -> RowSource:
        """The write-stage source of `frame`'s rows, in frame order (kaggle.Files or pcam_h5.H5Rows)."""


def stamps_of(frame: pd.DataFrame) -> list[tuple[int, int]]:
    """The (size, mtime_ns) each kept row had at inspection, as the write stage checks them."""
    return list(zip(frame["size"].tolist(), frame["mtime_ns"].tolist()))


@dataclass(frozen=True)
class Inventory:
    """Rows to inspect, per split, plus what was refused before reading any pixel."""

    layout: str  # kaggle | pcam-h5
    root: Path  # reject paths are written relative to this
    specs: tuple[SplitSpec, ...]
    splits: dict[str, pd.DataFrame]  # per split: id, path, [row], [label], [group]
    rejects: pd.DataFrame  # id, path (relative to root), reason, detail
    reader: RowReader
    checksummed: tuple[Path, ...] = ()  # whole source files to size and MD5 beside the decode (PCam's h5/csv)

    @property
    def train(self) -> pd.DataFrame:
        return self.splits["train"]

    @property
    def test(self) -> pd.DataFrame:
        return self.splits.get("test", pd.DataFrame({"id": [], "path": []}))


def reject_row(sample_id: str, path: Path | None, root: Path, reason: str, detail: str, split: str) -> dict:
    if reason not in REASONS:
        raise ValueError(f"unknown reject reason {reason!r}; add it to sources.base.REASONS (and the README)")
    rel = "" if path is None else os.path.relpath(path, root)
    return {"id": sample_id, "path": rel, "reason": reason, "detail": detail, "split": split}
