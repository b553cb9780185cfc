"""Checks that turn a batch of source files into kept images or reasons.

`inspect_batch` is the first pure stage of a build: it reads, decodes, validates and
fingerprints one batch of files and keeps no pixels: the write stage reads the (page-cached)
files again through `load_images`, which checks that each is unchanged since inspection.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from ..errors import SourceChanged
from ..files import check_unchanged
from ..memory import scratch
from ..moments import Moments, channel_moments, merge
from ..qc import COLUMNS as QC_COLUMNS
from ..qc import measure
from .decode import Reject, TiffDecoder, read_file

logger = logging.getLogger(__name__)

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
    qc: np.ndarray  # (N, len(qc.COLUMNS)) float64 quality metrics of the accepted images (NaN for rejected rows)


def inspect_one(path: str, decoder: TiffDecoder) -> tuple[np.ndarray, tuple[int, int]]:
    """Read and decode one file; raise Reject with the reason."""
    try:
        data, stamp = read_file(path)
    except OSError as exc:
        raise Reject("io-error", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    return decoder.decode(data, path), stamp


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
    less than parking 28 KB per image in fresh memory.
    """
    decoder = decoder_for(tuple(shape))
    n = len(paths)
    digests, reasons, details = [""] * n, [""] * n, [""] * n
    stamps = np.full((n, 2), -1, np.int64)  # an array, not n tuples: the driver holds these for every image
    parts: list[Moments] = []
    metrics = np.full((n, len(QC_COLUMNS)), np.nan)
    block = scratch("inspect", (_BLOCK, *shape))
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
            images, accepted = block[: len(rows)], np.asarray(rows)
            if not keep_blank:
                images, accepted = _reject_blank(images, accepted, reasons, details, digests)
            if with_moments:
                parts.append(channel_moments(images))
            metrics[accepted] = measure(images)
            rows = []
    ok = np.array([r == "" for r in reasons], bool)
    return BatchReport(ok, reasons, details, digests, stamps, merge(parts) if with_moments else None, metrics)


def _reject_blank(images, rows, reasons, details, digests) -> tuple[np.ndarray, np.ndarray]:
    """The non-blank images and their row numbers; blank rows get their reason."""
    blank = blank_mask(images)
    for j in np.flatnonzero(blank):
        i = rows[j]
        reasons[i], details[i], digests[i] = "blank", f"every pixel is {int(images[j].flat[0])}", ""
    return (images[~blank], rows[~blank]) if blank.any() else (images, rows)


_BLOCK = 64  # images decoded between checks: small enough to stay in cache
def load_images(paths: list[str], stamps: list[tuple[int, int]] | list[list[int]], shape: tuple[int, int, int]) -> np.ndarray:
    """Re-read accepted files for the write stage; fail loudly if one changed since inspection."""
    decoder = decoder_for(tuple(shape))
    out = np.empty((len(paths), *shape), np.uint8)
    for i, (path, stamp) in enumerate(zip(paths, stamps)):
        try:
            data, now = read_file(path)
            check_unchanged(path, stamp, now)
            out[i] = decoder.decode(data, path)
        except (FileNotFoundError, Reject) as exc:  # passed inspection, so it changed since
            what = "was removed" if isinstance(exc, FileNotFoundError) else f"is now rejected ({exc})"
            raise SourceChanged(f"{path} {what} while the build was running; run the build again to pick up "
                                "the change") from None
    return out
