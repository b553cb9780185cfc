"""manifest.json: its version, reading and writing it, and the rule that its paths stay inside OUT.

The build writes the manifest last, so a folder with one is whole; what goes into it is
`pipeline.card`. Every reader (loader, verify, EDA, trainer) opens a build through `read_manifest`.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import PcamPrepError
from .files import build_in_progress, sha256_file, write_json_atomic
from .schema import MANIFEST_NAME

MANIFEST_VERSION = 1


def file_entry(out: Path, path: Path, fmt: str, split: str | None, fold: int | None, count: int, sha256: str) -> dict:
    return {
        "path": path.relative_to(out).as_posix(), "format": fmt, "split": split, "fold": fold,
        "count": int(count), "sha256": sha256,
    }


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
        busy = build_in_progress(Path(out))
        if busy:
            raise PcamPrepError(f"{out} is being built right now ({busy}); its files are not whole until the build "
                                f"writes {MANIFEST_NAME}: wait for it to finish")
        raise PcamPrepError(f"{out} has no {MANIFEST_NAME}: not a finished pcam-prep build (run `pcam-prep build`; "
                            "an interrupted build resumes when rerun)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PcamPrepError(f"{path} is not valid JSON: {exc}") from None
    for entry in manifest.get("files", []):
        safe_relpath(Path(out), entry["path"])
    return manifest




def manifest_digest(out: Path) -> str:
    """sha256 of OUT's manifest.json: names one build exactly (a checkpoint records the build it trained on)."""
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        read_manifest(out)  # raises the usual "not a finished build" error
    return sha256_file(path)
