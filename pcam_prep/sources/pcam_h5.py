"""The official PatchCamelyon files: camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5.

x is (N, 96, 96, 3) uint8 under key "x", y is (N, 1, 1, 1) uint8 under key "y", and an
optional `..._{split}_meta.csv` has one row per patch whose `wsi` column names the slide it
was cut from (the group for folds). x is never read whole: inspection reads one row range per
task, the write stage reads the rows it needs chunk by chunk, and every task opens the file by
path. A row's id is the sha1 of its pixels, so it equals the Kaggle id of the same patch.

A split needs both its x and y file: an x without its y is an error (most often a y.h5.gz
not yet unzipped), never silently an unlabelled split. valid and test may be absent.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import PcamPrepError, SourceChanged
from ..files import check_unchanged, file_stamp
from ..moments import channel_moments
from ..qc import COLUMNS as QC_COLUMNS
from ..qc import measure
from ..schema import PCAM_SPLITS
from .base import REJECT_COLUMNS, Inventory, stamps_of
from .pcam_md5 import source_files
from .validate import BatchReport, blank_mask

logger = logging.getLogger(__name__)

X_KEY, Y_KEY = "x", "y"
META_GROUP = "wsi"
_SPAN_ROWS = 1024  # most rows one read may span (~28 MB at 96x96)


def pcam_file(split: str, member: str, ext: str = "h5") -> str:
    """`camelyonpatch_level_2_split_valid_y.h5` for ("valid", "y")."""
    return f"camelyonpatch_level_2_split_{split}_{member}.{ext}"


def is_pcam_dir(src: Path) -> bool:
    """True when `src` holds PCam split files (unzipped or not)."""
    return Path(src).is_dir() and any(Path(src).glob(pcam_file("*", "x", "h5*")))


@dataclass(frozen=True)
class SplitFiles:
    x: Path
    y: Path
    meta: Path | None


@dataclass(frozen=True)
class PcamLayout:
    root: Path
    splits: dict[str, SplitFiles]  # in PCAM_SPLITS order; valid/test only when present


def resolve_layout(src: Path, no_test: bool = False) -> PcamLayout:
    """Find each split's x, y and meta files in `src`; train is required, valid and test are not."""
    src = Path(src)
    if not src.is_dir():
        raise PcamPrepError(f"--src {src} is not a folder")
    found = {}
    for spec in PCAM_SPLITS:
        if spec.name == "test" and no_test:
            continue
        x, y = (src / pcam_file(spec.name, m) for m in (X_KEY, Y_KEY))
        present = [p for p in (x, y) if p.is_file()]
        if not present and spec.name != "train":
            logger.info("no %s split in %s", spec.name, src)
            continue
        missing = [p for p in (x, y) if not p.is_file()]
        if missing:
            raise PcamPrepError(f"{src}: the PCam {spec.name} split needs {x.name} and {y.name}; "
                                f"{_why_missing(missing)}")
        meta = src / pcam_file(spec.name, "meta", "csv")
        found[spec.name] = SplitFiles(x, y, meta if meta.is_file() else None)
    return PcamLayout(src, found)


def _why_missing(missing: list[Path]) -> str:
    zipped = [p for p in missing if p.with_name(p.name + ".gz").is_file()]
    if zipped:
        return f"found {', '.join(p.name + '.gz' for p in zipped)}: gunzip it first"
    return f"{', '.join(p.name for p in missing)} not found"


class H5Reader:
    """PCam rows: row `row` of the `x` dataset in file `path`."""

    ids_from_pixels = True
    held_columns = ()  # one path string per split and the row numbers: nothing worth dropping

    def inspect_call(self, rows: pd.DataFrame, shape, keep_blank: bool, with_moments: bool):
        start, stop = int(rows["row"].iloc[0]), int(rows["row"].iloc[-1]) + 1
        if stop - start != len(rows):
            raise ValueError(f"PCam rows are inspected as row ranges, got {len(rows)} rows in [{start}, {stop})")
        labels = rows["label"].to_numpy(np.int16) if "label" in rows else None
        return inspect_rows, (_one_path(rows), start, stop, labels, shape, keep_blank, with_moments)

    def locate(self, rows: pd.DataFrame, root: Path) -> list[str]:
        return [f"{os.path.relpath(p, root)}[{r}]" for p, r in zip(rows["path"], rows["row"])]

    def rows(self, frame: pd.DataFrame) -> H5Rows:
        if frame.empty:
            return H5Rows("", (-1, -1), np.zeros(0, np.int64))
        stamps = set(stamps_of(frame))
        if len(stamps) > 1:
            raise SourceChanged(f"{_one_path(frame)} changed while it was inspected (size/mtime {sorted(stamps)})")
        return H5Rows(_one_path(frame), stamps.pop(), frame["row"].to_numpy(np.int64))


def _one_path(rows: pd.DataFrame) -> str:
    paths = rows["path"].unique()
    if len(paths) != 1:
        raise ValueError(f"rows of one PCam split come from one x file, got {list(paths)}")
    return str(paths[0])


@dataclass(frozen=True)
class H5Rows:
    """Rows of a PCam x dataset, read again by the write stage; the file must not have changed."""

    path: str
    stamp: tuple[int, int]  # (size, mtime_ns) at inspection
    index: np.ndarray  # row numbers in x, in output order

    def __len__(self) -> int:
        return len(self.index)

    def fingerprint(self) -> list[tuple[int, int, int]]:
        """What a piece's bytes depend on (pipeline.tasks.piece_plan): the file, and which rows."""
        return [(*self.stamp, int(r)) for r in self.index]

    def part(self, start: int, stop: int) -> H5Rows:
        return H5Rows(self.path, self.stamp, self.index[start:stop])

    def blocks(self, shape: tuple[int, int, int], rows: int):
        for start in range(0, len(self.index), rows):
            yield start, read_rows(self.path, self.index[start : start + rows], self.stamp)


def read_range(path: str, start: int, stop: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Rows [start, stop) of x, and the file's stamp (checked unchanged across the read)."""
    import h5py

    stamp = file_stamp(path)
    with h5py.File(path, "r") as fh:
        images = fh[X_KEY][start:stop]
    check_unchanged(path, stamp)
    return images, stamp


def read_rows(path: str, rows: np.ndarray, stamp: tuple[int, int]) -> np.ndarray:
    """Rows `rows` of x, in that order. Reads in file order, each touched chunk once per call."""
    import h5py

    check_unchanged(path, stamp)
    order = np.argsort(rows, kind="stable")
    wanted = np.asarray(rows)[order]
    with h5py.File(path, "r") as fh:
        x = fh[X_KEY]
        out = np.empty((len(wanted), *x.shape[1:]), x.dtype)
        for lo, hi, first, last in _spans(wanted, x.chunks[0] if x.chunks else 1, _SPAN_ROWS):
            out[order[first:last]] = x[lo:hi][wanted[first:last] - lo]
    check_unchanged(path, stamp)
    return out


def _spans(rows: np.ndarray, step: int, limit: int) -> list[tuple[int, int, int, int]]:
    """(lo, hi, first, last): one read of x[lo:hi] serves sorted rows[first:last].

    A span grows while the next row lies in the same or the next chunk of `step` rows, so a
    compressed chunk is decoded once and neighbouring rows of an unchunked file are one read.
    """
    spans, first = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] // step > rows[i - 1] // step + 1 or rows[i] - rows[first] >= limit:
            spans.append((int(rows[first]), int(rows[i - 1]) + 1, first, i))
            first = i
    return spans


def inspect_rows(path: str, start: int, stop: int, labels: np.ndarray | None, shape: tuple[int, int, int],
                 keep_blank: bool = False, with_moments: bool = False) -> BatchReport:
    """Read rows [start, stop) of x; fingerprint every row, reject bad labels and blank patches."""
    images, stamp = read_range(path, start, stop)
    if images.shape[1:] != tuple(shape):
        raise PcamPrepError(f"{path}: rows have shape {images.shape[1:]}, expected {tuple(shape)}")
    n = len(images)
    digests = [hashlib.sha1(image.data).hexdigest() for image in images]  # rows of a C-ordered array
    reasons, details = [""] * n, [""] * n
    if labels is not None:
        for i in np.flatnonzero(~np.isin(labels, (0, 1))):
            reasons[i], details[i] = "bad-label", f"label {int(labels[i])}"
    if not keep_blank:
        for i in np.flatnonzero(blank_mask(images)):
            if not reasons[i]:
                reasons[i], details[i] = "blank", f"every pixel is {int(images[i].flat[0])}"
    ok = np.array([r == "" for r in reasons], bool)
    kept = images if ok.all() else images[ok]
    moments = channel_moments(kept) if with_moments else None
    metrics = np.full((n, len(QC_COLUMNS)), np.nan)
    metrics[ok] = measure(kept)
    return BatchReport(ok, reasons, details, digests, np.tile(np.array(stamp, np.int64), (n, 1)), moments, metrics)


def scan(layout: PcamLayout, shape: tuple[int, int, int]) -> Inventory:
    """Shapes, labels and slide names of every split; no pixels are read."""
    frames = {}
    for split, files in layout.splits.items():
        n = _x_rows(files.x, shape)
        frame = pd.DataFrame({"id": "", "path": str(files.x), "row": np.arange(n, dtype=np.int64),
                              "label": _read_y(files.y, n)})
        if files.meta is not None:
            frame["group"] = _read_wsi(files.meta, n)
        frames[split] = frame
        logger.info("PCam %s: %d rows%s", split, n, "" if files.meta is None else ", slides from the meta CSV")
    specs = tuple(s for s in PCAM_SPLITS if s.name in frames)
    files = [p for f in layout.splits.values() for p in (f.x, f.y, f.meta) if p is not None]
    return Inventory("pcam-h5", layout.root, specs, frames, pd.DataFrame(columns=REJECT_COLUMNS), H5Reader(),
                     tuple(source_files(files)))


def _x_rows(path: Path, shape: tuple[int, int, int]) -> int:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            if X_KEY not in fh:
                raise PcamPrepError(f"{path} has no dataset {X_KEY!r} (found {sorted(fh)})")
            x = fh[X_KEY]
            if x.ndim != 4 or x.shape[1:] != tuple(shape) or x.dtype != np.uint8:
                want = ", ".join(map(str, shape))
                raise PcamPrepError(f"{path}: {X_KEY!r} is {x.shape} {x.dtype}, expected (N, {want}) uint8")
            if x.compression and x.chunks and x.chunks[0] > 1:
                logger.warning("%s is %s-compressed in chunks of %d rows; outputs are written in (fold, id) order, "
                               "so a chunk may be decoded once per shard that needs it: `h5repack -f NONE` is faster",
                               path.name, x.compression, x.chunks[0])
            return int(x.shape[0])
    except OSError as exc:
        raise PcamPrepError(f"cannot open {path} as HDF5: {exc}") from None


def _read_y(path: Path, n: int) -> np.ndarray:
    """y as int16 (one byte a row, so read whole); values other than 0/1 are rejected per row later."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            if Y_KEY not in fh:
                raise PcamPrepError(f"{path} has no dataset {Y_KEY!r} (found {sorted(fh)})")
            y = fh[Y_KEY]
            if y.ndim < 1 or y.shape[0] != n or int(np.prod(y.shape[1:])) != 1 or y.dtype.kind not in "iub":
                raise PcamPrepError(f"{path}: {Y_KEY!r} is {y.shape} {y.dtype}, expected ({n}, 1, 1, 1) uint8 "
                                    "(one label per row of x)")
            return y[:].reshape(n).astype(np.int16)
    except OSError as exc:
        raise PcamPrepError(f"cannot open {path} as HDF5: {exc}") from None


def _read_wsi(path: Path, n: int) -> pd.Series:
    try:
        meta = pd.read_csv(path, usecols=[META_GROUP], dtype=str)
    except ValueError as exc:  # no such column, or not a CSV
        raise PcamPrepError(f"PCam meta CSV {path}: needs a {META_GROUP!r} column ({exc})") from None
    if len(meta) != n:
        raise PcamPrepError(f"PCam meta CSV {path} has {len(meta)} rows, its x file {n}")
    return meta[META_GROUP]
