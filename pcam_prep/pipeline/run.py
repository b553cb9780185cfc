"""`pcam-prep build`, top to bottom as the data flows (the README's numbered steps).

    found    = analyse(config)                   1-6. scan, decode, validate, dedup, stats, folds (pipeline.analyse)
    pieces   = write_outputs(found)              7. wds shards, then Zarr / HDF5 copied from them (pipeline.write)
    manifest = describe(found, pieces)           the dataset card, written last: a folder with one is whole

The executor (pipeline.executor) is the only place that knows about Dask; every stage hands it
plain functions and arguments.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import write_json_atomic
from ..manifest import write_manifest
from ..memory import release_freed_memory
from ..schema import MANIFEST_NAME, RUN_INFO_NAME
from .analyse import Clock, analyse
from .card import describe, describe_files, write_tables
from .config import BuildConfig
from .executor import Executor, ProgressFn
from .write import write_outputs


@dataclass(frozen=True)
class BuildSummary:
    out: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]


def build(config: BuildConfig, progress: ProgressFn | None = None) -> BuildSummary:
    """Build every requested format from `config.src` (Kaggle folders or PCam HDF5 files) into `config.out`."""
    clock = Clock()
    out = config.out.resolve()
    _prepare_out(out)
    preload = tuple(m for f, m in (("zarr", "zarr"), ("hdf5", "h5py")) if f in config.formats)
    with Executor(config.scheduler, config.n_workers, progress, preload) as executor:
        found = analyse(config, executor, clock)
        release_freed_memory()
        pieces = write_outputs(executor, out, found, config)
        clock.lap("write")
    files = describe_files(out, config, found, pieces)
    files += write_tables(out, found.rejects, found.dedup.duplicates)
    manifest = describe(config, found, files)
    clock.lap("checksums")
    write_json_atomic(out / RUN_INFO_NAME, _run_info(config, executor, clock.laps))
    write_manifest(out, manifest)
    return BuildSummary(out, manifest, clock.laps)


def _prepare_out(out: Path) -> None:
    """Remove the old manifest first: from here until the new one lands, OUT is not whole."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)


def _run_info(config: BuildConfig, executor: Executor, laps: dict[str, float]) -> dict[str, Any]:
    return {"host": platform.node(), "cpus": os.cpu_count(), "scheduler": executor.description,
            "execution": config.execution(), "seconds": laps, "stages": executor.timings,
            "finished_unix": time.time()}
