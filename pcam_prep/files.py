"""File utilities every layer shares: temporary names, atomic writes, sha256, "unchanged" checks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import SourceChanged
from .memory import scratch

_HASH_CHUNK = 1024 * 1024


def tmp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (same folder: rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = tmp_path(path)
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = scratch("sha256", (_HASH_CHUNK,))  # one reused buffer: fresh pages per read cost more than hashing
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


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(size, mtime_ns): what "this source file is unchanged" is judged by."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def check_unchanged(path: str | Path, stamp: tuple[int, int], now: tuple[int, int] | None = None) -> None:
    """Raise SourceChanged unless `path` still has the (size, mtime_ns) it had at inspection."""
    now = tuple(now) if now is not None else file_stamp(path)
    if now != tuple(stamp):
        raise SourceChanged(f"{path} changed while the build was running (size/mtime {tuple(stamp)} -> {now}); "
                            "run the build again to pick up the new content")
