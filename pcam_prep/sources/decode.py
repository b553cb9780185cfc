"""Bytes of one .tif -> a validated (H, W, 3) uint8 array, or a reject reason.

tifffile is the reference decoder. The fast path only skips work it has already proven
redundant: once tifffile has decoded a file whose pixels are one contiguous uncompressed
strip, any later file whose *non-pixel* bytes are identical (same length, same header, same
IFD, same tags) must decode the same way, so its pixels are a plain slice. The real Kaggle
files all share one such layout, so nearly every file takes the slice.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import tifffile

from .base import REASONS

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 8 * 1024 * 1024  # a 96x96 RGB patch is ~28 KB in any sane encoding
MAX_PIXELS = 4096 * 4096  # refuse to even decode headers that promise more than this
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class _TiffLog(logging.Handler):
    """tifffile's log records, caught per thread while one of our decodes runs.

    tifffile logs what it tolerates in a corrupt file (e.g. "invalid circular reference to
    IFD") on its own logger, which would print raw to the terminal from every worker. Here
    they become part of the file's reject detail, or an info line of ours (`-v`) when
    the file still decodes; they never propagate to the root logger.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        caught = getattr(self.local, "caught", None)
        if caught is None:
            logger.debug("tifffile: %s", record.getMessage())
        else:
            caught.append(record.getMessage())

    @contextmanager
    def catching(self) -> Iterator[list[str]]:
        self.local.caught = caught = []
        try:
            yield caught
        finally:
            self.local.caught = None


_TIFF_LOG = _TiffLog()
_tifffile_logger = logging.getLogger("tifffile")
_tifffile_logger.addHandler(_TIFF_LOG)
_tifffile_logger.propagate = False


class Reject(Exception):
    """A file that cannot become a sample; `reason` is a short stable code for rejects.csv."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; add it to sources.base.REASONS (and the README)")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TiffDecoder:
    """Decode 96x96 RGB uint8 TIFFs, with a cache of layouts proven to be plain slices."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self.nbytes = int(np.prod(shape))
        self._layouts: dict[int, list[tuple[int, bytes, bytes]]] = {}
        self._lock = threading.Lock()

    def decode(self, data: bytes, name: str = "a file") -> np.ndarray:
        """Return the image for `data`, or raise Reject with the reason; `name` is for log lines."""
        for offset, head, tail in self._layouts.get(len(data), ()):
            if data.startswith(head) and (not tail or data.endswith(tail)):
                return np.frombuffer(data, np.uint8, self.nbytes, offset).reshape(self.shape)
        image, offset = self._decode_tifffile(data, name)
        if offset is not None:
            self._remember(data, offset)
        return image

    def _remember(self, data: bytes, offset: int) -> None:
        end = offset + self.nbytes
        layout = (offset, data[:offset], data[end:])
        with self._lock:
            layouts = self._layouts.setdefault(len(data), [])
            if layout not in layouts and len(layouts) < 16:
                layouts.append(layout)
                logger.debug("cached TIFF layout: %d bytes, pixels at %d", len(data), offset)

    def _decode_tifffile(self, data: bytes, name: str) -> tuple[np.ndarray, int | None]:
        if not data:
            raise Reject("empty", "zero-byte file")
        if data[:4] not in _TIFF_MAGIC:
            raise Reject("not-tiff", f"{_sniff(data)} (starts with {data[:4]!r})")
        with _TIFF_LOG.catching() as said:
            try:
                with tifffile.TiffFile(io.BytesIO(data)) as tif:
                    if len(tif.pages) != 1:
                        raise Reject("multi-page", f"{len(tif.pages)} pages")
                    page = tif.pages.first
                    self._check_header(page, len(data))
                    image = page.asarray()
                    slice_offset = _plain_strip_offset(page)
            except Reject as reject:
                raise _with_log(reject, said) from None
            except (TypeError, AttributeError, NameError):
                raise  # our bugs, not bad data
            except Exception as exc:  # tifffile raises many types for corrupt input
                raise _with_log(Reject("unreadable", f"{type(exc).__name__}: {exc}"), said) from None
        if said:
            logger.info("%s decoded, but tifffile said: %s", name, "; ".join(dict.fromkeys(said)))
        image = self._to_hwc(page, image)
        if slice_offset is not None:
            view = np.frombuffer(data, np.uint8, self.nbytes, slice_offset).reshape(self.shape)
            if not np.array_equal(view, image):  # never trust the layout without proof
                slice_offset = None
        return np.ascontiguousarray(image), slice_offset

    def _check_header(self, page: tifffile.TiffPage, size: int) -> None:
        shape = tuple(int(s) for s in page.shape)
        if int(np.prod(shape, dtype=np.float64)) > MAX_PIXELS * 4:
            raise Reject("too-large", f"header claims shape {shape}")
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            if offset + count > size:
                raise Reject("truncated", f"strip at {offset}+{count} beyond {size}-byte file")
        if page.dtype != np.uint8:
            raise Reject("bad-dtype", f"dtype {page.dtype}, expected uint8")
        samples = int(page.samplesperpixel)
        if samples != self.shape[2] or len(shape) != 3:
            raise Reject("bad-channels", f"{samples} channel(s), expected {self.shape[2]}")
        hw = (int(page.imagelength), int(page.imagewidth))
        if hw != self.shape[:2]:
            raise Reject("bad-shape", f"{hw[0]}x{hw[1]}, expected {self.shape[0]}x{self.shape[1]}")

    def _to_hwc(self, page: tifffile.TiffPage, image: np.ndarray) -> np.ndarray:
        if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and image.shape[0] == self.shape[2]:
            image = np.moveaxis(image, 0, -1)
        if image.shape != self.shape:
            raise Reject("bad-shape", f"decoded shape {image.shape}, expected {self.shape}")
        return image


_MAGIC = ((b"\xff\xd8\xff", "a JPEG file"), (b"\x89PNG", "a PNG file"), (b"GIF8", "a GIF file"), (b"BM", "a BMP file"),
          (b"\x89HDF", "an HDF5 file"), (b"PK\x03\x04", "a zip archive"), (b"%PDF", "a PDF file"))


def _sniff(data: bytes) -> str:
    """What a non-TIFF file most likely is, for the reject detail."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WebP file"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), "not a TIFF")


def _with_log(reject: Reject, said: list[str]) -> Reject:
    """The reject with what tifffile logged about the file appended to its detail (each message once)."""
    if not said:
        return reject
    logged = "; ".join(dict.fromkeys(said))
    return Reject(reject.reason, f"{reject.detail} (tifffile: {logged})" if reject.detail else f"tifffile: {logged}")


def _plain_strip_offset(page: tifffile.TiffPage) -> int | None:
    """Offset of the pixels when they are one uncompressed, interleaved, native-order strip."""
    plain = (
        page.compression == tifffile.COMPRESSION.NONE
        and len(page.dataoffsets) == 1
        and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
        and page.predictor == 1
        and not page.is_tiled
    )
    return int(page.dataoffsets[0]) if plain else None


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def read_file(path: str) -> tuple[bytes, tuple[int, int]]:
    """Bytes of a source file and its (size, mtime_ns), refusing anything too big to be a patch.

    Never follows a symbolic link (it could point outside SRC) and never blocks on a pipe or
    device: only regular files are read, whatever the scan saw.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Reject("not-regular", "symbolic link (never followed)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Reject("not-regular", "not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise Reject("too-large", f"{st.st_size}-byte file; a patch is ~28 KB")
        data = os.read(fd, st.st_size)
    finally:
        os.close(fd)
    if len(data) != st.st_size:
        raise Reject("io-error", f"read {len(data)} of {st.st_size} bytes")
    return data, (st.st_size, st.st_mtime_ns)
