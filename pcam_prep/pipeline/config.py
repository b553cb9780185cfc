"""Typed, frozen run configurations and their TOML form.

A config is resolved once (file, then flags on top), validated, and saved beside the
artefacts, so every output says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PcamPrepError
from ..files import read_toml
from ..qc import Thresholds, parse_flags
from ..schema import FORMATS, IMAGE_SIZE

# Settings that change how fast a build runs but never what it writes; they are kept
# out of the manifest so outputs stay byte-identical across machines and schedulers.
EXECUTION_FIELDS = ("workers", "scheduler", "batch_size", "space_check")


@dataclass(frozen=True)
class BuildConfig:
    src: Path  # Kaggle competition root (train/, test/, train_labels.csv) or its train/ folder, or a PCam h5 folder
    out: Path  # output folder; created if missing
    layout: str = "auto"  # auto | kaggle | pcam-h5: how to read src; auto: pcam-h5 if src holds PCam .h5 files
    labels: Path | None = None  # id,label CSV; default: train_labels.csv beside train/
    test: Path | None = None  # test/ folder; default: test/ beside train/ when present
    no_test: bool = False  # skip the test split even when test/ exists
    formats: tuple[str, ...] = FORMATS  # any of wds, zarr, hdf5
    folds: int = 5  # stratified k-fold; 1 puts everything in fold 0
    groups: Path | None = None  # id,group CSV: stratified *group* k-fold (e.g. by slide)
    exclude: Path | None = None  # CSV with an id column (e.g. cv's label_review.csv): train ids to leave out
    seed: int = 0  # fold assignment seed
    shard_size: int = 5000  # samples per WebDataset shard (~145 MB at 96x96)
    chunk_rows: int = 256  # images per Zarr/HDF5 chunk: one chunk ~ one training batch
    hdf5_codec: str = "none"  # none | lzf | gzip: built-in filters only, so any HDF5 reader opens it
    torchvision_names: bool = False  # also write OUT/pcam/camelyonpatch_level_2_split_*_{x,y}.h5 (labelled splits)
    image_size: int = IMAGE_SIZE  # expected height and width; anything else is rejected
    keep_blank: bool = False  # keep all-black / all-white patches instead of rejecting them
    near_duplicates: bool = False  # also find flipped/rotated copies (one more read of every kept image)
    strict: bool = False  # exit non-zero when anything was rejected
    drop_flags: tuple[str, ...] = ()  # QC flags whose images leave the labelled splits (listed in rejects.csv)
    qc_centre_tissue: float = Thresholds.centre_tissue  # centre-background below this tissue share of the centre
    qc_blur: float = Thresholds.blur  # blurry: variance of the centre's Laplacian below this (grey levels^2)
    qc_dark: float = Thresholds.dark  # dark: 95th percentile grey level below this
    qc_bright: float = Thresholds.bright  # overexposed: 5th percentile grey level above this
    allow_empty: bool = False  # write a build that keeps no train image (or no image of a split that had inputs)
    batch_size: int = 2048  # files per Dask task; thousands amortise the ~1 ms task cost
    workers: int | None = None  # local threads; default: one per core
    scheduler: str | None = None  # 'threads', 'processes', 'sync' or a tcp:// dask.distributed address
    space_check: bool = True  # refuse to start writing when OUT's filesystem has less free space than the estimate

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise PcamPrepError(f"--formats: unknown format(s) {bad or self.formats!r}; choose from {', '.join(FORMATS)}")
        if self.layout not in ("auto", "kaggle", "pcam-h5"):
            raise PcamPrepError(f"layout must be auto, kaggle or pcam-h5, got {self.layout!r}")
        if self.hdf5_codec not in ("none", "lzf", "gzip"):
            raise PcamPrepError(f"hdf5_codec must be none, lzf or gzip, got {self.hdf5_codec!r}")
        positive = {"folds": self.folds, "shard_size": self.shard_size, "chunk_rows": self.chunk_rows,
                    "batch_size": self.batch_size, "image_size": self.image_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise PcamPrepError(f"{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "drop_flags", parse_flags(self.drop_flags))
        for name in ("qc_centre_tissue", "qc_blur", "qc_dark", "qc_bright"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise PcamPrepError(f"{name} must be a number, got {value!r}")
        if self.workers is not None and self.workers < 1:
            raise PcamPrepError(f"workers must be >= 1, got {self.workers!r}")

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.qc_centre_tissue, self.qc_blur, self.qc_dark, self.qc_bright)

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    def recorded(self) -> dict[str, Any]:
        """The settings that determine the outputs, as JSON-ready values."""
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items() if k not in EXECUTION_FIELDS}

    def execution(self) -> dict[str, Any]:
        return {k: _jsonable(getattr(self, k)) for k in EXECUTION_FIELDS}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


_PATH_FIELDS = {"src", "out", "labels", "test", "groups", "exclude"}


def load_toml(path: Path, section: str) -> dict[str, Any]:
    """Read the `[section]` table of a run spec; relative paths in it are relative to the spec file.

    So `pcam-prep build --config pipelines/smoke.toml` means the same from any directory.
    """
    values = dict(read_toml(path, "--config").get(section, {}))
    for name in _PATH_FIELDS & values.keys():
        if isinstance(values[name], str) and not Path(values[name]).expanduser().is_absolute():
            values[name] = str(Path(path).parent / values[name])
    return values


def build_config(file_values: dict[str, Any], flags: dict[str, Any]) -> BuildConfig:
    """Merge a spec file's values with command-line flags (flags win) into a BuildConfig."""
    known = {f.name for f in dataclasses.fields(BuildConfig)}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise PcamPrepError(f"unknown build setting(s) in config: {', '.join(unknown)}")
    merged = {**file_values, **{k: v for k, v in flags.items() if v is not None}}
    for name in _PATH_FIELDS & merged.keys():
        merged[name] = Path(merged[name])
    if isinstance(merged.get("formats"), str):
        merged["formats"] = tuple(f.strip() for f in merged["formats"].split(",") if f.strip())
    elif "formats" in merged:
        merged["formats"] = tuple(merged["formats"])
    for required in ("src", "out"):
        if required not in merged:
            raise PcamPrepError(f"missing required setting --{required}")
    return BuildConfig(**merged)
