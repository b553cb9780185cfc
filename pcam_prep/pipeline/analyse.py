"""Build steps 1-6: scan, decode, validate, dedup, stats and folds. Nothing is written.

    inventory = scan_source(src)                 1. rows per split (tif files or PCam h5 rows) + labels, no pixels
    reports   = inspect(batches)   [parallel]    2-3. decode, validate, sha1, moments
    kept      = dedup(samples)                   4. exact / conflicting / train-vs-held-out leakage
    moments   = kept_moments(...)                5. exact per-channel moments of the kept train images
    folds     = assign_folds(kept)               6. stratified (group) k-fold of train

Splits come from the source layout (schema.SplitSpec): Kaggle has train (labelled, folded) and
test (unlabelled); PCam has train, valid and test, all labelled. Only train is folded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import PcamPrepError
from ..moments import Moments, channel_moments, merge
from ..qc import COLUMNS as QC_COLUMNS
from ..schema import RowSource, SplitSpec, image_shape
from ..sources import pcam_md5, scan_source
from ..sources.base import REJECT_COLUMNS, Inventory, RowReader
from .config import BuildConfig
from .dedup import Dedup, dedup, dedup_dihedral, dihedral_digests
from .exclude import apply_exclude
from .executor import Executor
from .folds import assign_folds
from .qcflags import apply_drop_flags
from .tasks import BLOCK_ROWS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysis:
    """Everything a build knows before it writes: what is kept, in output order, and why not."""

    # Per split, in spec order, the kept rows: id, path, [row], [label], [group], digest, size, mtime_ns, the
    # qc.COLUMNS metrics, and for train fold. Train is ordered by (fold, id), every other split by id. After
    # holding_rows (the build's write stage), the columns the reader copied into `sources` (Kaggle: path) are gone.
    splits: dict[str, pd.DataFrame]
    specs: tuple[SplitSpec, ...]
    rejects: pd.DataFrame  # id, path, reason, detail, split (QC flags dropped by --drop-flags among them)
    dedup: Dedup
    moments: Moments  # exact pixel moments of the kept train images
    shape: tuple[int, int, int]
    reader: RowReader  # how the write stage reads the kept rows again
    layout: str = "kaggle"  # the source layout: kaggle | pcam-h5
    group_by: str | None = None  # what grouped the folds: "csv" (--groups), "wsi" (PCam meta CSV) or None
    excluded: dict | None = None  # --exclude: train ids left out on purpose (count, listed, file, sha256)
    source_files: dict | None = None  # PCam: each source file's size and MD5 against the published ones
    sources: dict[str, RowSource] | None = None  # per split, its rows' RowSource, once made (holding_rows)

    @property
    def train(self) -> pd.DataFrame:
        return self.splits["train"]

    @property
    def test(self) -> pd.DataFrame:
        return self.splits.get("test", _empty(SplitSpec("test", False)))

    def rows(self, split: str) -> RowSource:
        """Where the write stage reads `split`'s kept rows from, in output order."""
        if self.sources is not None:
            return self.sources[split]
        return self.reader.rows(self.splits[split])

    def holding_rows(self) -> Analysis:
        """This analysis with every split's RowSource made once, and the frame columns it copied dropped.

        For the write stage: at 277k Kaggle images the paths are ~30 MB of str in the frames and
        ~12 MB packed in the sources, held by the driver through the longest stage.
        """
        sources = {split: self.reader.rows(frame) for split, frame in self.splits.items()}
        splits = {split: frame.drop(columns=list(self.reader.held_columns)) for split, frame in self.splits.items()}
        return replace(self, splits=splits, sources=sources, dedup=replace(self.dedup, kept=splits))


def analyse(config: BuildConfig, executor: Executor, clock: Clock | None = None) -> Analysis:
    """Scan, decode, validate, dedup, measure and fold-assign; write nothing."""
    clock = clock or Clock()
    shape = image_shape(config.image_size)
    inventory = scan_source(config, shape)
    clock.lap("scan")
    decoded, rejects, moments, checksums = inspect(executor, inventory, shape, config)
    clock.lap("decode")
    result = dedup(decoded, inventory.specs)
    if config.near_duplicates:
        result = dedup_dihedral(result, dihedral_stage(executor, result, inventory.reader, shape, config),
                                inventory.specs)
        clock.lap("dihedral")
    result, excluded = apply_exclude(result, config.exclude)
    result, flagged = apply_drop_flags(result, inventory.specs, config.drop_flags, config.thresholds,
                                       inventory.reader, inventory.root)
    if len(flagged):
        rejects = pd.concat([rejects, flagged], ignore_index=True).sort_values(["reason", "id"], ignore_index=True)
    moments = kept_moments(moments, inventory.reader, result.dropped, shape)
    groups, group_by = fold_groups(config, result.train)
    train = result.train
    train["fold"] = assign_folds(train, config.folds, config.seed, groups)
    check_folds(train["fold"].to_numpy(), config.folds, groups is not None, config.allow_empty)
    splits = {"train": train.sort_values(["fold", "id"], kind="stable", ignore_index=True)}
    for spec in (s for s in inventory.specs if not s.folded):
        splits[spec.name] = result.kept[spec.name].sort_values("id", kind="stable", ignore_index=True)
    clock.lap("dedup+folds")
    result = replace(result, kept=splits)  # the same rows in output order: not a second copy through the write stage
    return Analysis(splits, inventory.specs, rejects, result, moments, shape, inventory.reader, inventory.layout,
                    group_by, excluded, checksums)


def read_groups(path: Path) -> pd.Series:
    """`id,group` CSV (e.g. slide ids) as a Series id -> group."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"id", "group"} <= set(frame.columns):
        raise PcamPrepError(f"--groups {path}: expected columns id,group, found {list(frame.columns)}")
    return frame.drop_duplicates("id").set_index("id")["group"]


def check_folds(folds: np.ndarray, k: int, grouped: bool, allow_empty: bool) -> None:
    """Every fold gets images: --folds 20 over 15 images is refused, not written with 5 empty folds."""
    empty = sorted(set(range(k)) - set(np.unique(folds).tolist()))
    if empty and len(folds) and not allow_empty:
        unit = "groups" if grouped else "train images"
        raise PcamPrepError(f"--folds {k}: fold(s) {', '.join(map(str, empty))} would be empty with {len(folds)} "
                            f"kept train images{' in fewer groups' if grouped else ''}; choose fewer folds "
                            f"(at most the number of {unit})")


def fold_groups(config: BuildConfig, train: pd.DataFrame) -> tuple[pd.Series | None, str | None]:
    """id -> group for stratified group k-fold: --groups wins over the PCam meta CSV's slides."""
    if config.groups:
        return read_groups(config.groups), "csv"
    if "group" in train and train["group"].notna().any():
        return train.set_index("id")["group"], "wsi"  # ids are unique once dedup has run
    return None, None


def inspect(executor: Executor, inventory: Inventory, shape: tuple[int, int, int], config: BuildConfig):
    """Inspect every split in parallel batches; return kept rows per split, rejects, train moments."""
    reader = inventory.reader
    batches = [(spec, frame.iloc[start : start + config.batch_size])
               for spec in inventory.specs for frame in [inventory.splits[spec.name]]
               for start in range(0, len(frame), config.batch_size)]
    calls = [reader.inspect_call(rows, shape, config.keep_blank, spec.folded) for spec, rows in batches]
    # Whole-file MD5s (PCam) run as tasks beside the decode, biggest first, on a bar of their own (MiB).
    files = sorted(((p.stat().st_size, str(p)) for p in inventory.checksummed), reverse=True)
    sums = [(pcam_md5.file_md5, (path,)) for _, path in files]
    results = executor.map("decode", sums + calls, [max(1, size >> 20) for size, _ in files] +
                           [len(rows) for _, rows in batches], ["md5"] * len(sums) + ["decode"] * len(calls))
    hashed, reports = results[: len(sums)], results[len(sums) :]
    kept: dict[str, list[pd.DataFrame]] = {spec.name: [] for spec in inventory.specs}
    rejects = [inventory.rejects]
    for (spec, rows), report in zip(batches, reports):
        if reader.ids_from_pixels:
            rows = rows.assign(id=report.digests)
        ok = report.ok
        good = rows[ok].copy()
        ids, digests = good["id"].to_numpy(), np.asarray(report.digests, dtype=object)[ok]
        good["digest"] = np.where(ids == digests, ids, digests)  # Kaggle ids are the digests: share the id's string
        good["size"], good["mtime_ns"] = report.stamps[ok, 0], report.stamps[ok, 1]  # int64 columns, no tuples
        for i, column in enumerate(QC_COLUMNS):
            good[column] = report.qc[ok, i].astype(np.float32)
        kept[spec.name].append(good)
        bad = ~ok
        rejects.append(pd.DataFrame({
            "id": rows["id"][bad].to_numpy(),
            "path": reader.locate(rows[bad], inventory.root),
            "reason": [r for r, b in zip(report.reasons, bad) if b],
            "detail": [d for d, b in zip(report.details, bad) if b],
            "split": spec.name,
        }))
    frames = {s.name: _labels_int8(pd.concat(kept[s.name], ignore_index=True)) if kept[s.name] else _empty(s)
              for s in inventory.specs}
    rejects = pd.concat(rejects, ignore_index=True)[REJECT_COLUMNS].sort_values(["reason", "id"], ignore_index=True)
    moments = merge([r.moments for r in reports if r.moments is not None])
    return frames, rejects, moments, pcam_md5.record(hashed, inventory.root) if hashed else None


def dihedral_stage(executor: Executor, result: Dedup, reader: RowReader, shape, config: BuildConfig):
    """Dihedral digests of every kept image, per split (id -> digest), in tasks of `batch_size` images."""
    parts = [(name, frame.iloc[start : start + config.batch_size]) for name, frame in result.kept.items()
             for start in range(0, len(frame), config.batch_size)]
    calls = [(dihedral_digests, (reader.rows(rows), shape)) for _, rows in parts]
    found: dict[str, list[pd.Series]] = {name: [] for name in result.kept}
    for (name, rows), digests in zip(parts, executor.map("dihedral", calls, [len(rows) for _, rows in parts])):
        found[name].append(pd.Series(digests, index=rows["id"].to_numpy(), dtype=object))
    return {name: pd.concat(series) if series else pd.Series(dtype=object) for name, series in found.items()}


def kept_moments(decoded: Moments, reader: RowReader, dropped: pd.DataFrame, shape) -> Moments:
    """Moments of the kept train images: everything decoded minus what dedup dropped."""
    if dropped.empty:
        return decoded
    return decoded - merge([channel_moments(images) for _, images in reader.rows(dropped).blocks(shape, BLOCK_ROWS)])


def _labels_int8(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype({"label": "int8"}) if "label" in frame else frame  # kept labels are 0/1


def _empty(spec: SplitSpec) -> pd.DataFrame:
    columns = {"id": [], "path": [], "digest": [], "size": [], "mtime_ns": [], **{c: [] for c in QC_COLUMNS}}
    if spec.labelled:
        columns["label"] = []
    return pd.DataFrame(columns)




class Clock:
    """Wall seconds per build stage, for run.json."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 4)
        self.last = now
        self.laps["total"] = round(now - self.start, 4)
