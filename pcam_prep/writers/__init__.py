"""Writers for the three output formats and the manifest that describes them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASH_CHUNK = 8 * 1024 * 1024


def tmp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (same folder: rename is atomic)."""
    return path.with_name(f".{path.name}.partial")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(root: Path) -> str:
    """One digest for a directory store: sha256 over sorted `relpath\\0filehash\\n` lines."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            lines.append(f"{full.relative_to(root).as_posix()}\0{sha256_file(full)}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
