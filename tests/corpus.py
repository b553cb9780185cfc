"""Hostile and awkward inputs, written with real tifffile, for the decode and build tests."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import tifffile

SHAPE = (96, 96, 3)


def image(seed: int, shape=SHAPE, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def sha1_id(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


# Valid encodings of one 96x96 RGB uint8 image: every one must decode to the same pixels.
ENCODINGS = {
    "plain": {},
    "lzw": {"compression": "lzw"},
    "deflate": {"compression": "zlib"},
    "planar-separate": {"planarconfig": "separate"},
    "tiled": {"tile": (32, 32)},
    "multi-strip": {"rowsperstrip": 8},
    "bigtiff": {"bigtiff": True},
    "big-endian": {"byteorder": ">"},
    "no-metadata": {"metadata": None},
}


def write_encoding(path: Path, img: np.ndarray, name: str) -> Path:
    kwargs = dict(ENCODINGS[name])
    if kwargs.get("planarconfig") == "separate":
        tifffile.imwrite(path, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate")
    else:
        tifffile.imwrite(path, img, photometric="rgb", **kwargs)
    return path


def huge_header(path: Path) -> Path:
    """A tiny file whose header claims a 100000 x 100000 RGB image (a decompression bomb)."""
    tifffile.imwrite(path, image(1))
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages.first.tags
        for name in ("ImageWidth", "ImageLength"):
            tag = tags[name]
            fmt = "<I" if tag.dtype == 4 else "<H"
            value = 100_000 if fmt == "<I" else 60_000
            struct.pack_into(fmt, data, tag.valueoffset, value)
    path.write_bytes(bytes(data))
    return path


# Files that must be rejected, with the reason the build must give.
def write_bad(folder: Path) -> dict[str, str]:
    """Write one file per bad case into `folder`; return {stem: expected reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, str] = {}

    def put(stem: str, reason: str, writer) -> None:
        writer(folder / f"{stem}.tif")
        cases[stem] = reason

    put("zero-byte", "empty", lambda p: p.write_bytes(b""))
    put("truncated", "truncated", lambda p: (tifffile.imwrite(p, image(2)), p.write_bytes(p.read_bytes()[:5000])))
    put("not-a-tiff", "not-tiff", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)))
    put("grayscale", "bad-channels", lambda p: tifffile.imwrite(p, image(3, (96, 96))))
    put("rgba", "bad-channels", lambda p: tifffile.imwrite(p, image(4, (96, 96, 4)), photometric="rgb"))
    put("uint16", "bad-dtype", lambda p: tifffile.imwrite(p, image(5, SHAPE, np.uint16), photometric="rgb"))
    put("small-50", "bad-shape", lambda p: tifffile.imwrite(p, image(6, (50, 50, 3))))
    put("multi-page", "multi-page", lambda p: tifffile.imwrite(p, np.stack([image(7), image(8)]), photometric="rgb"))
    put("bomb", "too-large", huge_header)
    put("all-black", "blank", lambda p: tifffile.imwrite(p, np.zeros(SHAPE, np.uint8)))
    put("all-white", "blank", lambda p: tifffile.imwrite(p, np.full(SHAPE, 255, np.uint8)))
    return cases
