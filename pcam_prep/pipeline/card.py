"""The dataset card: what `manifest.json` says about a build (its files, splits, folds, stats)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from ..files import sha256_file, sha256_tree, tmp_path
from ..manifest import file_entry
from ..qc import FLAGS
from ..schema import DUPLICATES_NAME, QC_NAME, REJECTS_NAME, ZARR_NAME, SampleLayout, SplitSpec
from .analyse import Analysis
from .config import BuildConfig
from .dedup import is_kept_kind
from .qcflags import qc_record, qc_table
from .tasks import PieceResult

_PACKAGES = ("pcam-prep", "numpy", "tifffile", "zarr", "h5py", "webdataset", "pandas", "dask")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def describe_files(out: Path, config: BuildConfig, found: Analysis, pieces: list[PieceResult]) -> list[dict]:
    """The manifest's `files`: every output piece, in row order, with its digest."""
    files = []
    folded = {spec.name for spec in found.specs if spec.folded}
    for piece in (p for p in pieces if p.kind == "wds"):  # plan order = row order, also for >= 10 folds
        name = Path(piece.path).name
        fold = int(name.split("-")[1][1:]) if piece.split in folded else None
        files.append(file_entry(out, Path(piece.path), "wds", piece.split, fold, piece.count, piece.sha256))
    if "zarr" in config.formats:
        known = {rel: digest for p in pieces if p.kind == "zarr" for rel, digest in (p.digests or {}).items()}
        files.append(file_entry(out, out / ZARR_NAME, "zarr", None, None, sum(map(len, found.splits.values())),
                                sha256_tree(out / ZARR_NAME, known)))
    for piece in (p for p in pieces if p.kind in ("hdf5", "torchvision-h5")):
        split = piece.split if piece.kind == "torchvision-h5" else None
        files.append(file_entry(out, Path(piece.path), piece.kind, split, None, piece.count, piece.sha256))
    return files


def write_tables(out: Path, config: BuildConfig, found: Analysis) -> list[dict]:
    """rejects.csv, duplicates.csv and qc.csv, each with its manifest entry."""
    entries = []
    qc = qc_table(found.splits, found.specs, config.thresholds)
    for name, frame in ((REJECTS_NAME, found.rejects), (DUPLICATES_NAME, found.dedup.duplicates), (QC_NAME, qc)):
        path, tmp = out / name, tmp_path(out / name)
        frame.to_csv(tmp, index=False, lineterminator="\n")
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        entries.append(file_entry(out, path, "csv", None, None, len(frame), digest))
    return entries


def describe(config: BuildConfig, found: Analysis, files: list[dict]) -> dict[str, Any]:
    """The dataset card of an analysed build (eda.py also calls it, with no files, for a raw folder)."""
    train, rejects, result, moments, shape = found.train, found.rejects, found.dedup, found.moments, found.shape
    per_fold = train.groupby("fold")["label"].agg(["size", "sum"]).reindex(range(config.folds), fill_value=0)
    mismatched = sum(int((frame["digest"] != frame["id"]).sum()) for frame in found.splits.values())
    layouts = {spec.name: SampleLayout(shape, spec.labelled) for spec in found.specs}
    kept_copies = result.duplicates["kind"].map(is_kept_kind).astype(bool)
    return {
        "image_shape": list(shape),
        "dtype": "uint8",
        "source_layout": found.layout,
        "splits": {spec.name: _split_summary(found.splits[spec.name], spec) for spec in found.specs},
        "folds": {
            "k": config.folds, "seed": config.seed, "grouped": found.group_by is not None, "group_by": found.group_by,
            "counts": [{"fold": int(f), "count": int(r["size"]), "positives": int(r["sum"]),
                        "negatives": int(r["size"] - r["sum"])} for f, r in per_fold.iterrows()],
        },
        # no train image (only with --allow-empty): null, never NaN, which is not JSON
        "stats": {"mean": moments.mean if len(train) else None, "std": moments.std if len(train) else None,
                  "scale": "0-1", "images": len(train)},
        "rejects": {"count": len(rejects), "by_reason": rejects["reason"].value_counts().sort_index().to_dict()},
        "duplicates": {"count": int((~kept_copies).sum()),  # rows dropped; copies inside held-out splits stay
                       "by_kind": result.duplicates["kind"].value_counts().sort_index().to_dict(),
                       "kept_copies": int(kept_copies.sum()),
                       "leaked_test_images": result.leaked_test, "leaked_images": result.leaked},
        "ids": {"sha1_mismatch": int(mismatched)},
        "excluded": found.excluded or {"count": 0, "listed": 0, "file": None, "sha256": None},
        **({"source_files": found.source_files} if found.source_files else {}),
        "qc": qc_record(found.splits, found.specs, config.thresholds, config.drop_flags,
                        rejects[rejects["reason"].isin(list(FLAGS))]),
        "wds": {s: {"stride": l.stride, "pixel_offset": l.pixel_offset,
                    "label_offset": l.label_offset if l.labelled else None} for s, l in layouts.items()},
        "config": config.recorded(),
        "versions": package_versions(),
        "files": files,
    }


def _split_summary(frame: pd.DataFrame, spec: SplitSpec) -> dict[str, Any]:
    summary: dict[str, Any] = {"count": len(frame)}
    if spec.labelled:
        positives = int(frame["label"].sum())
        summary.update(positives=positives, negatives=len(frame) - positives)
    return {**summary, "labelled": spec.labelled, "folded": spec.folded}
