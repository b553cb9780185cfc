"""manifest.json: the dataset card, written last so that a folder with one is whole."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .. import PcamPrepError
from ..schema import DUPLICATES_NAME, MANIFEST_NAME, REJECTS_NAME, ZARR_NAME, SampleLayout, SplitSpec
from . import sha256_file, sha256_tree, tmp_path

if TYPE_CHECKING:  # the build's types; importing them here would be circular
    import pandas as pd

    from ..config import BuildConfig
    from ..pipeline import Analysis
    from ..write import PieceResult

MANIFEST_VERSION = 1
_PACKAGES = ("pcam-prep", "numpy", "tifffile", "zarr", "h5py", "webdataset", "pandas", "dask")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def file_entry(out: Path, path: Path, fmt: str, split: str | None, fold: int | None, count: int, sha256: str) -> dict:
    return {
        "path": path.relative_to(out).as_posix(), "format": fmt, "split": split, "fold": fold,
        "count": int(count), "sha256": sha256,
    }


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = tmp_path(path)
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    path = out / MANIFEST_NAME
    write_json_atomic(path, {"manifest_version": MANIFEST_VERSION, **manifest})
    return path


def safe_relpath(out: Path, rel: str) -> Path:
    """Resolve a manifest path inside OUT; refuse anything that would escape it."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or not rel:
        raise PcamPrepError(f"manifest path {rel!r} points outside {out}")
    return out / pure


def read_manifest(out: Path) -> dict[str, Any]:
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        raise PcamPrepError(f"{out} has no {MANIFEST_NAME}: not a finished pcam-prep build (run `pcam-prep build`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PcamPrepError(f"{path} is not valid JSON: {exc}") from None
    for entry in manifest.get("files", []):
        safe_relpath(Path(out), entry["path"])
    return manifest


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


def write_tables(out: Path, rejects: pd.DataFrame, duplicates: pd.DataFrame) -> list[dict]:
    entries = []
    for name, frame in ((REJECTS_NAME, rejects), (DUPLICATES_NAME, duplicates)):
        path = out / name
        frame.to_csv(path, index=False, lineterminator="\n")
        entries.append(file_entry(out, path, "csv", None, None, len(frame), sha256_file(path)))
    return entries


def describe(config: BuildConfig, found: Analysis, files: list[dict]) -> dict[str, Any]:
    """The dataset card of an analysed build (eda.py also calls it, with no files, for a raw folder)."""
    train, rejects, result, moments, shape = found.train, found.rejects, found.dedup, found.moments, found.shape
    per_fold = train.groupby("fold")["label"].agg(["size", "sum"]).reindex(range(config.folds), fill_value=0)
    mismatched = sum(int((frame["digest"] != frame["id"]).sum()) for frame in found.splits.values())
    layouts = {spec.name: SampleLayout(shape, spec.labelled) for spec in found.specs}
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
        "stats": {"mean": moments.mean, "std": moments.std, "scale": "0-1", "images": len(train)},
        "rejects": {"count": len(rejects), "by_reason": rejects["reason"].value_counts().sort_index().to_dict()},
        "duplicates": {"count": len(result.duplicates),
                       "by_kind": result.duplicates["kind"].value_counts().sort_index().to_dict(),
                       "leaked_test_images": result.leaked_test, "leaked_images": result.leaked},
        "ids": {"sha1_mismatch": int(mismatched)},
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
