"""Writers for the three output formats and the manifest that describes them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASH_CHUNK = 1024 * 1024


def tmp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (same folder: rename is atomic)."""
    return path.with_name(f".{path.name}.partial")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)  # one reused buffer: fresh pages per read cost more than hashing
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def tree_files(root: Path) -> list[str]:
    """Every file below `root`, as sorted posix paths relative to it."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        found += [(Path(dirpath) / name).relative_to(root).as_posix() for name in filenames]
    return sorted(found)


def sha256_tree(root: Path, known: dict[str, str] | None = None) -> str:
    """One digest for a directory store: sha256 over sorted `relpath\\0filehash\\n` lines.

    `known` holds digests already computed (by the tasks that wrote those files).
    """
    known = known or {}
    lines = [f"{rel}\0{known.get(rel) or sha256_file(root / rel)}\n" for rel in tree_files(root)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()
