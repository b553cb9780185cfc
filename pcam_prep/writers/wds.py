"""WebDataset tar shards with a fixed byte layout per sample.

Each sample is `<id>.npy` then (train) `<id>.cls`, as plain ustar members with mtime 0,
uid/gid 0 and no user names, so shards are reproducible byte for byte and readable by
`tar -t` and stock `webdataset`. Because every member has the same size, sample i lives at
i * stride (see schema.SampleLayout): loaders memory-map the pixels without decoding.

Headers are produced from one `tarfile` template per member kind, patched per sample with
the name and its checksum in a vectorised pass: tarfile itself costs ~18 us per header,
which would dominate a build. The tests read every shard back with tarfile and webdataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import DirectWriter, sha256_file, tmp_path
from ..memory import scratch
from ..schema import IMAGE_MEMBER, LABEL_MEMBER, TAR_BLOCK, TAR_RECORD, SampleLayout

_NAME = slice(0, 100)
_CHKSUM = slice(148, 156)
_OCTAL_SHIFTS = np.array([15, 12, 9, 6, 3, 0], np.int64)


@dataclass(frozen=True)
class ShardResult:
    path: Path
    count: int
    sha256: str
    nbytes: int


def _template(size: int) -> np.ndarray:
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = np.frombuffer(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), np.uint8).copy()
    header[_NAME] = 0
    header[_CHKSUM] = ord(" ")
    return header


def _headers(template: np.ndarray, names: list[str]) -> np.ndarray:
    """(N, 512) ustar headers: the template with each name and its checksum filled in."""
    encoded = np.array([n.encode("ascii") for n in names], dtype="S100")
    headers = np.repeat(template[None, :], len(names), axis=0)
    headers[:, _NAME] = encoded.view(np.uint8).reshape(len(names), 100)
    checksum = headers.sum(axis=1, dtype=np.int64)
    digits = (checksum[:, None] >> _OCTAL_SHIFTS) & 7
    headers[:, 148:154] = digits + ord("0")
    headers[:, 154] = 0
    headers[:, 155] = ord(" ")
    return headers


def encode_block(layout: SampleLayout, ids: list[str], images: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Tar bytes for a run of samples, as an (N, stride) uint8 array."""
    n = len(ids)
    if images.shape != (n, *layout.shape):
        raise ValueError(f"images have shape {images.shape}, expected {(n, *layout.shape)}")
    if layout.labelled != (labels is not None):
        raise ValueError("labels must be given exactly when the layout is labelled")
    # Reused and zeroed once: every sample writes the same byte ranges, so the padding stays zero.
    block = scratch("tar", (max(n, 512), layout.stride), zeroed=True)[:n]
    block[:, :TAR_BLOCK] = _headers(_template(layout.image_member_size), [f"{i}.{IMAGE_MEMBER}" for i in ids])
    header = np.frombuffer(layout.npy_header, np.uint8)
    block[:, TAR_BLOCK : layout.pixel_offset] = header
    block[:, layout.pixel_offset : layout.pixel_offset + layout.image_bytes] = images.reshape(n, -1)
    if labels is not None:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"labels must be 0/1, got {np.unique(labels).tolist()}")
        at = layout.label_offset - TAR_BLOCK
        block[:, at:layout.label_offset] = _headers(_template(1), [f"{i}.{LABEL_MEMBER}" for i in ids])
        block[:, layout.label_offset] = np.asarray(labels, np.uint8) + ord("0")
    return block


def write_shard(
    path: Path, layout: SampleLayout, blocks: Iterable[tuple[list[str], np.ndarray, np.ndarray | None]]
) -> ShardResult:
    """Stream (ids, images, labels) blocks into one shard, atomically, hashing as it goes."""
    digest = hashlib.sha256()
    tmp = tmp_path(path)
    count = nbytes = 0
    with DirectWriter(tmp) as fh:
        for ids, images, labels in blocks:
            data = encode_block(layout, ids, images, labels).data
            fh.write(data)
            digest.update(data)
            count += len(ids)
            nbytes += data.nbytes
        trailer = bytes(2 * TAR_BLOCK + (-(nbytes + 2 * TAR_BLOCK)) % TAR_RECORD)
        fh.write(trailer)
        digest.update(trailer)
    os.replace(tmp, path)
    return ShardResult(path, count, digest.hexdigest(), nbytes + len(trailer))


def _marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.done")


def mark_finished(result: ShardResult, plan: str) -> None:
    """Record what a finished shard was made from, so an interrupted build can keep it."""
    marker = _marker(result.path)
    tmp = tmp_path(marker)
    tmp.write_text(json.dumps({"plan": plan, "sha256": result.sha256, "count": result.count, "nbytes": result.nbytes}))
    os.replace(tmp, marker)


def reuse_finished(path: Path, plan: str) -> ShardResult | None:
    """The finished shard at `path` if it was made from the same plan and still hashes right."""
    marker = _marker(path)
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if record.get("plan") != plan or not path.is_file() or path.stat().st_size != record.get("nbytes"):
        return None
    if sha256_file(path, direct=True) != record["sha256"]:  # written with O_DIRECT: read it back that way
        return None
    return ShardResult(path, record["count"], record["sha256"], record["nbytes"])


def remove_with_marker(path: Path) -> None:
    path.unlink(missing_ok=True)
    _marker(path).unlink(missing_ok=True)
