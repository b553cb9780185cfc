"""The Kaggle competition layout: train/, test/, train_labels.csv.

Scanning touches only directory entries and the CSVs, never pixels: it decides which files
exist and what label each one has, and turns every inconsistency into a reject row.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import PcamPrepError
from ..schema import KAGGLE_SPLITS, is_safe_id
from .base import REJECT_COLUMNS, Inventory
from .base import reject_row as _reject
from .validate import inspect_batch, load_images

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class KaggleLayout:
    root: Path  # folder paths in outputs are written relative to this
    train: Path
    labels: Path
    test: Path | None


@dataclass(frozen=True)
class PackedPaths:
    """File paths as their common prefix, one buffer of the rest (os.fsencode) and where each row starts in it.

    ~45 B a Kaggle path, where a list of str costs ~125 B a row and a task unpickling it builds an
    object per row: the task that hashes the HDF5 file carries every path of the set (277k at full
    scale), and as a list that cost the driver ~46 MB (the pickle, held until the task ends, and its
    copy into the pipe) and its worker ~75 MB. A part is two numpy views of its parent: the driver
    holds every task's part at once and pays nothing for them, and a part pickles only its own rows.
    """

    prefix: str
    data: np.ndarray  # uint8: the rows' bytes after the prefix, back to back
    bounds: np.ndarray  # int64, one more than rows: row i is data[bounds[i] - bounds[0] : bounds[i + 1] - bounds[0]]

    @classmethod
    def of(cls, paths: Sequence[str]) -> PackedPaths:
        prefix = os.path.commonprefix(paths)  # "" for no paths
        rests = [os.fsencode(path[len(prefix) :]) for path in paths]
        bounds = np.zeros(len(rests) + 1, np.int64)
        np.cumsum([len(rest) for rest in rests], out=bounds[1:])
        return cls(prefix, np.frombuffer(b"".join(rests), np.uint8), bounds)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, row: int) -> str:
        row = range(len(self))[row]  # negative rows count from the end; out of range raises IndexError
        first, last = (int(b - self.bounds[0]) for b in self.bounds[row : row + 2])
        return self.prefix + os.fsdecode(self.data[first:last].tobytes())

    def part(self, start: int, stop: int) -> PackedPaths:
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        base = int(self.bounds[0])
        return PackedPaths(self.prefix, self.data[int(self.bounds[start]) - base : int(self.bounds[stop]) - base],
                           self.bounds[start : stop + 1])

    def tolist(self) -> list[str]:
        raw, bounds = self.data.tobytes(), (self.bounds - self.bounds[0]).tolist()
        return [self.prefix + os.fsdecode(raw[first:last]) for first, last in pairwise(bounds)]


@dataclass(frozen=True)
class Files:
    """Rows that come from the source files (re-read and checked against their stamps): a `schema.RowSource`."""

    paths: PackedPaths
    stamps: np.ndarray  # (N, 2) int64 (size, mtime_ns) at inspection: 16 B a row, not a tuple of two ints

    def __len__(self) -> int:
        return len(self.paths)

    def part(self, start: int, stop: int) -> Files:
        return Files(self.paths.part(start, stop), self.stamps[start:stop])

    def fingerprint(self) -> list[tuple[int, int]]:
        return [tuple(stamp) for stamp in self.stamps.tolist()]

    def blocks(self, shape: tuple[int, int, int], rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self.paths), rows):
            stop = start + rows
            yield start, load_images(self.paths.part(start, stop).tolist(), self.stamps[start:stop].tolist(), shape)


class TifReader:
    """Kaggle rows: one .tif file each, named by its id."""

    ids_from_pixels = False
    held_columns = ("path",)  # packed into Files: ~45 B a row there, ~125 B as the frame's str

    def inspect_call(self, rows: pd.DataFrame, shape, keep_blank: bool, with_moments: bool):
        return inspect_batch, (list(rows["path"]), shape, keep_blank, with_moments)

    def locate(self, rows: pd.DataFrame, root: Path) -> list[str]:
        return [os.path.relpath(p, root) for p in rows["path"]]

    def rows(self, frame: pd.DataFrame) -> Files:
        return Files(PackedPaths.of(frame["path"].tolist()), frame[["size", "mtime_ns"]].to_numpy(np.int64))


def resolve_layout(src: Path, labels: Path | None = None, test: Path | None = None,
                   no_test: bool = False) -> KaggleLayout:
    """Accept the competition root or its train/ folder and find the rest beside it."""
    src = Path(src)
    if not src.is_dir():
        raise PcamPrepError(f"--src {src} is not a folder")
    if (src / "train").is_dir():
        root, train = src, src / "train"
    else:
        root, train = src.parent, src
    labels = Path(labels) if labels else root / "train_labels.csv"
    if not labels.is_file():
        nested = sorted(p.parent for p in src.glob("*/train_labels.csv") if (p.parent / "train").is_dir())
        hint = f"; the competition folder seems to be one level down: --src {nested[0]}" if nested else \
            " (pass --labels, or point --src at the folder that holds train/ and train_labels.csv)"
        raise PcamPrepError(f"labels CSV not found: {labels.resolve()}{hint}")
    if no_test:
        test_dir = None
    elif test is not None:
        test_dir = Path(test)
        if not test_dir.is_dir():
            raise PcamPrepError(f"--test {test_dir} is not a folder")
    else:
        test_dir = root / "test" if (root / "test").is_dir() and (root / "test") != train else None
    return KaggleLayout(root, train, labels, test_dir)


def list_images(folder: Path, root: Path, split: str) -> tuple[pd.DataFrame, list[dict]]:
    """Image files in `folder` (id = file stem); other entries become rejects, and links are never followed."""
    names, stems, strays = [], [], []  # stems: each id's length (small ints: shared objects, nothing allocated)
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if entry.is_dir(follow_symlinks=False) and entry.name.startswith("."):
                continue  # hidden folders (.ipynb_checkpoints, .git) are not data: ignored, like the OS does
            if not entry.is_file(follow_symlinks=False):  # a link could point anywhere: outside SRC included
                kind = "symbolic link" if entry.is_symlink() else "folder" if entry.is_dir() else "special file"
                strays.append(_reject(stem, Path(entry.path), root, "not-regular", f"{kind} {entry.name}", split))
                continue
            if suffix.lower() not in IMAGE_SUFFIXES or not is_safe_id(stem):
                strays.append(_reject(stem, Path(entry.path), root, "stray-file", entry.name, split))
                continue
            names.append(entry.name)
            stems.append(len(stem))
    # ids, then paths, each made in one run: the build drops the paths once they are packed (holding_rows),
    # and strings made in a run of their own fill memory arenas of their own, which are then returned whole
    ids = [name[:n] for name, n in zip(names, stems)]
    base = os.path.join(os.fspath(folder), "")  # what entry.path is: the folder as given, joined to the name
    paths = [base + name for name in names]
    del names, stems
    frame = pd.DataFrame({"id": ids, "path": paths}).sort_values("id", ignore_index=True)
    return frame, strays


def read_labels(path: Path) -> pd.DataFrame:
    """`id,label` as strings; bad values are judged later so they can be reported per row."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise PcamPrepError(f"cannot parse labels CSV {path}: {exc}") from None
    missing = {"id", "label"} - set(frame.columns)
    if missing:
        raise PcamPrepError(f"labels CSV {path} lacks column(s) {sorted(missing)}; found {list(frame.columns)}")
    return frame[["id", "label"]].map(str.strip)


def scan(layout: KaggleLayout) -> Inventory:
    """Match files to labels; every file or row that can't be a sample becomes a reject."""
    files, rejects = list_images(layout.train, layout.root, "train")
    labels = read_labels(layout.labels)
    unsafe = ~labels["id"].map(is_safe_id)
    rejects += [_reject(i, None, layout.root, "bad-id", f"id {i!r}", "train") for i in labels.loc[unsafe, "id"]]
    labels = labels[~unsafe]
    dup_rows = labels.duplicated("id", keep=False)
    conflicting = labels[dup_rows].groupby("id")["label"].nunique().loc[lambda s: s > 1].index
    labels = labels.drop_duplicates("id")
    merged = files.merge(labels, on="id", how="outer", indicator="match", sort=True)
    listed = {r["id"] for r in rejects if r["reason"] in ("not-regular", "stray-file")}  # rejected as what they are
    for row in merged[(merged["match"] == "right_only") & ~merged["id"].isin(listed)].itertuples():
        rejects.append(_reject(row.id, None, layout.root, "missing-file", f"{row.id}.tif not in {layout.train.name}/", "train"))
    present = merged[merged["match"] != "right_only"]
    bad = present["match"].eq("left_only") | ~present["label"].isin(["0", "1"]) | present["id"].isin(conflicting)
    for row in present[bad].itertuples():
        reason, detail = _label_problem(row, conflicting)
        rejects.append(_reject(row.id, Path(row.path), layout.root, reason, detail, "train"))
    train = present[~bad][["id", "path", "label"]].astype({"label": "int8"}).reset_index(drop=True)
    test = pd.DataFrame({"id": [], "path": []})
    if layout.test is not None:
        test, strays = list_images(layout.test, layout.root, "test")
        rejects += strays
    frame = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
    logger.info("scanned %d train and %d test files, %d rejected", len(train), len(test), len(frame))
    return Inventory("kaggle", layout.root, KAGGLE_SPLITS, {"train": train, "test": test}, frame, TifReader())


def _label_problem(row, conflicting) -> tuple[str, str]:
    if row.match == "left_only":
        return "no-label", "no row in the labels CSV"
    if row.id in conflicting:
        return "bad-label", "labels CSV gives this id different labels"
    return "bad-label", f"label {row.label!r}"

