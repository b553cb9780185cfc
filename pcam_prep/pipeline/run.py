"""`pcam-prep build`, top to bottom as the data flows (the README's numbered steps).

    found    = analyse(config)                   1-6. scan, decode, validate, dedup, stats, folds (pipeline.analyse)
    pieces   = write_outputs(found)              7. wds shards, then Zarr / HDF5 copied from them (pipeline.write)
    manifest = describe(found, pieces)           the dataset card, written last: a folder with one is whole

The executor (pipeline.executor) is the only place that knows about Dask; every stage hands it
plain functions and arguments.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import OutOfSpace, PcamPrepError, Refused, TaskFailed
from ..files import exclusive_folder, free_bytes, human_bytes, is_out_of_space, write_json_atomic
from ..manifest import write_manifest
from ..memory import release_freed_memory
from ..schema import BUILD_LOG_NAME, MANIFEST_NAME, RUN_INFO_NAME
from .analyse import Analysis, Clock, analyse
from .card import describe, describe_files, write_tables
from .config import BuildConfig
from .executor import Executor, ProgressFn
from .write import remove_partials, space_needed, write_outputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildSummary:
    out: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]
    reused: tuple[int, int] = (0, 0)  # (shards kept from an earlier run, shards in the build)


def build(config: BuildConfig, progress: ProgressFn | None = None) -> BuildSummary:
    """Build every requested format from `config.src` (Kaggle folders or PCam HDF5 files) into `config.out`.

    One build per OUT: the folder's lock is held throughout, and a second build is refused
    (errors.Refused) before it touches anything. Failures end as one PcamPrepError line: a full
    disk names the file and removes the temporary files (a rerun resumes from the finished
    shards); an unexpected error in a task names its stage and files, its traceback in OUT/build.log.
    """
    out = config.out.resolve()
    with exclusive_folder(out):
        try:
            return _build(config, out, progress)
        except (OutOfSpace, OSError) as exc:
            if not isinstance(exc, OutOfSpace) and not is_out_of_space(exc):
                raise
            what = str(exc) if isinstance(exc, OutOfSpace) else f"no space left on the device while writing {out}"
            remove_partials(out)
            free = human_bytes(free_bytes(out))
            raise OutOfSpace(f"{what} ({free} free now); free some space and rerun the same command: it resumes "
                             "from the finished shards (temporary files were removed)") from None
        except TaskFailed as exc:
            log = out / BUILD_LOG_NAME
            log.write_text(f"{exc}\n\n{exc.details}")
            raise TaskFailed(f"{exc} (traceback in {log})", exc.details) from None


def _build(config: BuildConfig, out: Path, progress: ProgressFn | None) -> BuildSummary:
    clock = Clock()
    # Imported by each worker while the driver scans: the compiled pixel loops, and the format libraries
    preload = ("pcam_prep.kernels", *(m for f, m in (("zarr", "zarr"), ("hdf5", "h5py")) if f in config.formats))
    with Executor(config.scheduler, config.n_workers, progress, preload) as executor:
        found = analyse(config, executor, clock).holding_rows()
        release_freed_memory()
        check_kept(found, config)
        need, free = space_needed(out, found, config), free_bytes(out)
        if config.space_check and need > free:
            raise Refused(f"need ~{human_bytes(need)} in {out}, {human_bytes(free)} free (pass --no-space-check to "
                          "try anyway)")
        _prepare_out(out)  # nothing was written before this point: a refused build leaves OUT as it was
        # The tables are the driver's own work (~0.7 s at 100k): done in a thread while the workers write.
        with ThreadPoolExecutor(1, thread_name_prefix="pcam-prep-tables") as side:
            tables = side.submit(write_tables, out, config, found)
            try:
                pieces = write_outputs(executor, out, found, config)
            except OutOfSpace as exc:
                raise OutOfSpace(f"{exc}; this build needs ~{human_bytes(need)} in all") from None
            clock.lap("write")
            table_files = tables.result()
    files = describe_files(out, config, found, pieces) + table_files
    manifest = describe(config, found, files)
    clock.lap("checksums")
    write_json_atomic(out / RUN_INFO_NAME, _run_info(config, executor, clock.laps))
    write_manifest(out, manifest)
    shards = [p for p in pieces if p.kind == "wds"]
    return BuildSummary(out, manifest, clock.laps, (sum(p.reused for p in shards), len(shards)))


def check_kept(found: Analysis, config: BuildConfig) -> None:
    """Refuse a build that keeps no train image, or nothing of a split that had inputs (unless --allow-empty)."""
    for spec in found.specs:
        rejected = found.rejects[found.rejects["split"] == spec.name]
        if len(found.splits[spec.name]) or (spec.name != "train" and rejected.empty):
            continue
        counts = rejected["reason"].value_counts()
        why = ", ".join(f"{n} {reason}" for reason, n in counts.items()) or "no input files at all"
        message = f"no {spec.name} image kept ({why}){empty_hint(spec.name, rejected, config)}"
        if not config.allow_empty:
            raise PcamPrepError(f"{message} (--allow-empty writes such a build anyway)")
        logger.warning("%s: writing it anyway (--allow-empty)", message)


def empty_hint(split: str, rejected: pd.DataFrame, config: BuildConfig) -> str:
    """The likely wrong turn behind an empty split, as ' - did you mean ...?'."""
    reasons = set(rejected["reason"])
    src = config.src.resolve()
    if src.name == "test" and (src.parent / "train").is_dir():
        return f" - {config.src} looks like the test/ folder: did you mean --src {src.parent}?"
    missing = rejected.loc[rejected["reason"] == "missing-file", "id"]
    if len(missing) and missing.str.lower().str.endswith((".tif", ".tiff")).all():
        return " - the labels CSV ids end in .tif: ids are file names without the extension"
    if {"missing-file", "no-label"} <= reasons:
        n_missing, n_unlabelled = (int((rejected["reason"] == r).sum()) for r in ("missing-file", "no-label"))
        return (f" - {n_missing} labels rows have no file in {split}/ and {n_unlabelled} files have no label: is "
                "--labels the train labels CSV (train_labels.csv, not sample_submission.csv)?")
    if reasons == {"bad-shape"}:
        sizes = rejected["detail"].str.extract(r"^(\d+x\d+)")[0].dropna()
        seen = sizes.mode().iloc[0] if len(sizes) else "another size"
        return f" - the images are {seen}, not {config.image_size}x{config.image_size}: pass --image-size to build them"
    return ""


def _prepare_out(out: Path) -> None:
    """Remove the old manifest first: from here until the new one lands, OUT is not whole."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    (out / BUILD_LOG_NAME).unlink(missing_ok=True)


def _run_info(config: BuildConfig, executor: Executor, laps: dict[str, float]) -> dict[str, Any]:
    return {"host": platform.node(), "cpus": os.cpu_count(), "scheduler": executor.description,
            "execution": config.execution(), "seconds": laps, "stages": executor.timings,
            "finished_unix": time.time()}
