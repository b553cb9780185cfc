"""Integrity of the official PCam files: each source file's size and MD5, against the published checksums.

The published MD5s are of the `.h5.gz` downloads (torchvision checks them before unpacking), so an
unpacked `.h5` has no published value: its size and MD5 are recorded for comparison between
machines, and a `.h5.gz` kept beside it (`gunzip -k`) is hashed and checked. A mismatch is a
warning, not an error: the build's own checks (shapes, labels, sha1 of every row) still decide.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..files import hash_file

logger = logging.getLogger(__name__)

CHECKSUM_SOURCE = ("torchvision 0.29.1, torchvision/datasets/pcam.py, PCAM._FILES: MD5 of each .h5.gz download "
                   "(the basveeling/pcam README swaps the valid_x and test_x values; torchvision has them right)")
PUBLISHED_MD5 = {
    "camelyonpatch_level_2_split_train_x.h5.gz": "1571f514728f59376b705fc836ff4b63",
    "camelyonpatch_level_2_split_train_y.h5.gz": "35c2d7259d906cfc8143347bb8e05be7",
    "camelyonpatch_level_2_split_valid_x.h5.gz": "d5b63470df7cfa627aeec8b9dc0c066e",
    "camelyonpatch_level_2_split_valid_y.h5.gz": "2b85f58b927af9964a4c15b8f7e8f179",
    "camelyonpatch_level_2_split_test_x.h5.gz": "d8c2d60d490dbd479f8199bdfa0cf6ec",
    "camelyonpatch_level_2_split_test_y.h5.gz": "60a7035772fbdb7f34eb86d4420cf66a",
}


def source_files(paths: list[Path]) -> list[Path]:
    """The files to hash: every given file, and the `.gz` download beside each one if it is still there."""
    found = []
    for path in paths:
        found.append(path)
        packed = path.with_name(path.name + ".gz")
        if packed.is_file():
            found.append(packed)
    return found


def file_md5(path: str) -> tuple[str, int, str]:
    """(path, size, md5) of one file: a task of its own, run beside the decode tasks."""
    size, md5 = hash_file(Path(path), "md5")
    return path, size, md5


def check(name: str, md5: str, published: dict[str, str] = PUBLISHED_MD5) -> dict[str, Any]:
    """The manifest record's verdict for one file: match, mismatch (naming the file it matches, if any), or none."""
    want = published.get(name)
    if want is None:
        why = "published MD5s are of the .h5.gz downloads" if name.endswith(".h5") else "no published MD5"
        return {"published_md5": None, "status": "unpublished", "note": why}
    if md5 == want:
        return {"published_md5": want, "status": "match"}
    other = next((n for n, v in published.items() if v == md5), None)
    note = f"this is the published MD5 of {other}: renamed or swapped files?" if other else "corrupt or not the official file"
    return {"published_md5": want, "status": "mismatch", "note": note}


def record(hashed: list[tuple[str, int, str]], root: Path, published: dict[str, str] = PUBLISHED_MD5) -> dict[str, Any]:
    """The manifest's `source_files`, with a warning logged per mismatch."""
    files = []
    for path, size, md5 in sorted(hashed):
        name = Path(path).name
        verdict = check(name, md5, published)
        if verdict["status"] == "mismatch":
            logger.warning("%s: MD5 %s is not the published %s (%s)", name, md5, verdict["published_md5"],
                           verdict["note"])
        files.append({"path": Path(path).relative_to(root).as_posix() if Path(path).is_relative_to(root) else path,
                      "size": size, "md5": md5, **verdict})
    return {"checksums_from": CHECKSUM_SOURCE, "files": files}
