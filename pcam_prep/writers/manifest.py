"""manifest.json: the dataset card, written last so that a folder with one is whole."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from .. import PcamPrepError
from ..schema import MANIFEST_NAME
from . import tmp_path

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
