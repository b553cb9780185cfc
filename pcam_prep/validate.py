"""Checks that turn a batch of source files into kept images or reasons.

`inspect_batch` is the first pure stage of a build: it reads, decodes, validates and
fingerprints one batch of files and spills the good pixels to one .npy file, so the write
stage can gather them later without decoding anything twice.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass

import numpy as np

from . import PcamPrepError
from .decode import Reject, TiffDecoder, read_file
from .stats import Moments, channel_moments, merge

logger = logging.getLogger(__name__)

# Every reason a file can be rejected for, with the words rejects.csv users will read.
REASONS = {
    "empty": "zero-byte file",
    "not-tiff": "not a TIFF file",
    "unreadable": "corrupt or unsupported TIFF",
    "truncated": "file shorter than its pixel data",
    "too-large": "file or header larger than any patch could be",
    "multi-page": "more than one image in the file",
    "bad-shape": "wrong height/width",
    "bad-channels": "not 3-channel RGB",
    "bad-dtype": "not 8-bit",
    "blank": "all-black or all-white patch",
    "no-label": "no row in the labels CSV",
    "bad-label": "label is not 0 or 1",
    "bad-id": "id is not a plain file name",
    "missing-file": "labels row whose file does not exist",
    "stray-file": "not a .tif file",
    "not-regular": "symbolic link, folder or device where a file was expected (never followed)",
    "io-error": "could not be read from disk",
}

_DECODERS: dict[tuple[int, int, int], TiffDecoder] = {}


def decoder_for(shape: tuple[int, int, int]) -> TiffDecoder:
    """One decoder (and layout cache) per process and image shape."""
    return _DECODERS.setdefault(shape, TiffDecoder(shape))


@dataclass(frozen=True)
class BatchReport:
    """What one batch of files turned into. Row i describes input file i."""

    ok: np.ndarray  # (N,) bool
    reasons: list[str]  # "" for accepted files
    details: list[str]
    digests: list[str]  # sha1 hex of the pixel bytes ("" when rejected)
    stamps: np.ndarray  # (N, 2) int64 (size, mtime_ns) as read, -1 if unread: the write stage checks them
    moments: Moments | None  # pixel moments of the accepted images, when asked for


def inspect_one(path: str, decoder: TiffDecoder) -> tuple[np.ndarray, tuple[int, int]]:
    """Read and decode one file; raise Reject with the reason."""
    try:
        data, stamp = read_file(path)
    except OSError as exc:
        raise Reject("io-error", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    return decoder.decode(data), stamp


def blank_mask(images: np.ndarray) -> np.ndarray:
    """True for all-black or all-white images."""
    flat = images.reshape(len(images), -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    return (lo == hi) & ((lo == 0) | (lo == 255))


def inspect_batch(
    paths: list[str], shape: tuple[int, int, int], keep_blank: bool = False, with_moments: bool = False
) -> BatchReport:
    """Decode and check `paths`; fingerprint and measure the accepted images.

    Pixels are not kept: the write stage reads the (page-cached) files again, which costs
    less than parking 28 KB per image in fresh memory or a spill file.
    """
    decoder = decoder_for(tuple(shape))
    n = len(paths)
    digests, reasons, details = [""] * n, [""] * n, [""] * n
    stamps = np.full((n, 2), -1, np.int64)  # an array, not n tuples: the driver holds these for every image
    parts: list[Moments] = []
    block = _buffer(_BLOCK, tuple(shape))
    rows: list[int] = []
    for i, path in enumerate(paths):
        try:
            image, stamps[i] = inspect_one(path, decoder)
        except Reject as reject:
            reasons[i], details[i] = reject.reason, reject.detail
        else:
            block[len(rows)] = image
            digests[i] = hashlib.sha1(block[len(rows)].data).hexdigest()
            rows.append(i)
        if len(rows) == _BLOCK or (i == n - 1 and rows):
            images = block[: len(rows)]
            if not keep_blank:
                images = _reject_blank(images, rows, reasons, details, digests)
            if with_moments:
                parts.append(channel_moments(images))
            rows = []
    ok = np.array([r == "" for r in reasons], bool)
    return BatchReport(ok, reasons, details, digests, stamps, merge(parts) if with_moments else None)


def _reject_blank(images, rows, reasons, details, digests) -> np.ndarray:
    blank = blank_mask(images)
    for j in np.flatnonzero(blank):
        i = rows[j]
        reasons[i], details[i], digests[i] = "blank", f"every pixel is {int(images[j].flat[0])}", ""
    return images[~blank] if blank.any() else images


_BLOCK = 64  # images decoded between checks: small enough to stay in cache
_local = threading.local()


def _buffer(n: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A per-thread scratch array: fresh pages cost more than the decoding here."""
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.shape[1:] != shape or len(buf) < n:
        buf = _local.buffer = np.empty((n, *shape), np.uint8)
    return buf[:n]


def load_images(paths: list[str], stamps: list[tuple[int, int]], shape: tuple[int, int, int]) -> np.ndarray:
    """Re-read accepted files for the write stage; fail loudly if one changed since inspection."""
    decoder = decoder_for(tuple(shape))
    out = np.empty((len(paths), *shape), np.uint8)
    for i, (path, stamp) in enumerate(zip(paths, stamps)):
        data, now = read_file(path)
        if tuple(now) != tuple(stamp):
            raise SourceChanged(f"{path} changed while the build was running (size/mtime {stamp} -> {now})")
        out[i] = decoder.decode(data)
    return out


class SourceChanged(PcamPrepError):
    """A source file was modified between inspection and writing."""
