"""The one description of what the writers write and the loaders read.

Every writer and every loader imports its names, shapes and layouts from here, so the
two sides cannot drift apart: image shape, the label's centre window, split flags, file
names, the shard byte layout (and the strided view of a shard's pixels), and the protocol
every source of rows follows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

IMAGE_SIZE = 96
CHANNELS = 3
IMAGE_DTYPE = np.dtype(np.uint8)
FORMATS = ("wds", "zarr", "hdf5")


@dataclass(frozen=True)
class SplitSpec:
    """One output split: does it carry labels, is it divided into folds (only train is)."""

    name: str
    labelled: bool
    folded: bool = False

    def __post_init__(self) -> None:
        if self.folded and (not self.labelled or self.name != "train"):
            raise ValueError(f"only a labelled 'train' split can be folded, got {self!r}")


KAGGLE_SPLITS = (SplitSpec("train", True, True), SplitSpec("test", False))  # test labels are Kaggle's secret
PCAM_SPLITS = (SplitSpec("train", True, True), SplitSpec("valid", True), SplitSpec("test", True))

# Array stores (zarr and HDF5 share these paths).
ZARR_NAME = "pcam.zarr"
HDF5_NAME = "pcam.h5"
WDS_DIR = "wds"
MANIFEST_NAME = "manifest.json"
RUN_INFO_NAME = "run.json"  # timings and host: kept out of the checksummed outputs
BUILD_LOG_NAME = "build.log"  # the traceback of a build that failed unexpectedly
REJECTS_NAME = "rejects.csv"
DUPLICATES_NAME = "duplicates.csv"
BACKGROUND_SATURATION = 0.07  # PCam's tissue/background threshold on HSV saturation (max-min)/max
QC_NAME = "qc.csv"  # per kept image: centre-aware quality metrics and flags (pcam_prep.qc)

# WebDataset members. Only these are ever decoded by our loaders.
IMAGE_MEMBER = "npy"
LABEL_MEMBER = "cls"

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # what tarfile pads a finished archive to

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,90}$")  # fits a ustar member name with its suffix


# torchvision.datasets.PCAM reads ROOT/pcam/camelyonpatch_level_2_split_{train,val,test}_{x,y}.h5, keys x and y.
TORCHVISION_DIR = "pcam"
TORCHVISION_SPLITS = {"train": "train", "valid": "val", "test": "test"}


def torchvision_name(split: str, member: str) -> str:
    """`camelyonpatch_level_2_split_val_x.h5` for split "valid", member "x"."""
    return f"camelyonpatch_level_2_split_{TORCHVISION_SPLITS[split]}_{member}.h5"


def image_shape(size: int = IMAGE_SIZE) -> tuple[int, int, int]:
    return (size, size, CHANNELS)


def centre_window(size: int) -> slice:
    """The PCam label window along one axis: a size//3 run centred in `size` (32:64 of 96).

    A patch is positive when tumour touches this square; the models pool the same window of
    their last feature map, and the report outlines it.
    """
    width = size // 3
    start = (size - width) // 2
    return slice(start, start + width)




def is_safe_id(sample_id: str) -> bool:
    """True when `sample_id` is a plain file stem: no separators, no '..', no hidden names."""
    return bool(_ID_RE.match(sample_id)) and ".." not in sample_id


def npy_header(shape: tuple[int, ...], dtype: np.dtype = IMAGE_DTYPE) -> bytes:
    """The exact bytes `np.save` puts before the data of a C-ordered array."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def _padded(n: int) -> int:
    return -(-n // TAR_BLOCK) * TAR_BLOCK


@dataclass(frozen=True)
class SampleLayout:
    """Byte layout of one sample inside a shard: every sample has the same size.

    A sample is `<id>.npy` (npy header + H*W*3 bytes) followed, for labelled splits, by
    `<id>.cls` (one ASCII digit). Each member is a 512-byte tar header plus its data padded
    to 512, so sample i starts at i * stride and its pixels sit at a fixed offset: a shard
    can be memory-mapped as a strided (N, H, W, 3) uint8 array.
    """

    shape: tuple[int, int, int]
    labelled: bool

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.shape))

    @property
    def npy_header(self) -> bytes:
        return npy_header(self.shape)

    @property
    def image_member_size(self) -> int:
        return len(self.npy_header) + self.image_bytes

    @property
    def pixel_offset(self) -> int:
        """Offset of the first pixel byte from the start of the sample."""
        return TAR_BLOCK + len(self.npy_header)

    @property
    def label_offset(self) -> int:
        """Offset of the label digit from the start of the sample."""
        return TAR_BLOCK + _padded(self.image_member_size) + TAR_BLOCK

    @property
    def stride(self) -> int:
        image = TAR_BLOCK + _padded(self.image_member_size)
        return image + (2 * TAR_BLOCK if self.labelled else 0)


def shard_name(split: str, index: int, fold: int | None = None) -> str:
    """`train-f2-000003.tar`, `valid-000000.tar` or `test-000000.tar`; train shards never mix folds."""
    if split == "train" and fold is None:
        raise ValueError("train shards need a fold")
    if fold is not None:
        return f"{split}-f{fold}-{index:06d}.tar"
    return f"{split}-{index:06d}.tar"


def pixels_view(data: np.ndarray, layout: SampleLayout, count: int) -> np.ndarray:
    """The pixels of `count` consecutive samples in `data` (shard bytes) as a strided (count, H, W, 3) view."""
    h, w, c = layout.shape
    return np.lib.stride_tricks.as_strided(
        data[layout.pixel_offset :], shape=(count, h, w, c), strides=(layout.stride, w * c, c, 1), writeable=False
    )


ZARR_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
ZARR_ABSENT = 2**64 - 1  # the index entry of an inner chunk that was never written


def zarr_sharding(meta: dict) -> tuple[int, int] | None:
    """(rows per shard, rows per inner chunk) of a Zarr v3 `x` laid out as `build` writes it, else None.

    That layout: uint8, regular shards of whole images keyed `c/i/0/0/0`, uncompressed inner
    chunks (`bytes` only) and the default index (little-endian, crc32c, at the end). In it a
    shard's rows are plain C-order bytes from offset 0 (Zarr v3 sharding spec, `sharding_indexed`).
    """
    try:
        (codec,) = meta["codecs"]
        config, grid = codec["configuration"], meta["chunk_grid"]
        shard, inner, image = grid["configuration"]["chunk_shape"], config["chunk_shape"], meta["shape"][1:]
        ours = (codec["name"] == "sharding_indexed" and grid["name"] == "regular" and meta["data_type"] == "uint8"
                and shard[1:] == inner[1:] == image and shard[0] % inner[0] == 0
                and [c["name"] for c in config["codecs"]] == ["bytes"] and config["index_codecs"] == ZARR_INDEX_CODECS
                and config.get("index_location", "end") == "end" and not meta.get("storage_transformers")
                and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}})
    except (KeyError, TypeError, ValueError):
        return None
    return (shard[0], inner[0]) if ours else None


def zarr_shard_body(rows: int, per: tuple[int, int], image_bytes: int) -> int:
    """Bytes before the index in a shard of `rows` images: every inner chunk that holds one, the last zero-padded."""
    return -(-rows // per[1]) * per[1] * image_bytes


def zarr_shard_tail(rows: int, per: tuple[int, int], image_bytes: int) -> bytes:
    """The index a shard of `rows` images ends with: (offset, nbytes) little-endian uint64 per inner chunk, in
    order, `ZARR_ABSENT` for chunks past the array's end, then the crc32c of those bytes (zarr writes exactly this)."""
    import google_crc32c  # a dependency of zarr itself

    shard, inner = per
    used, chunk_bytes = -(-rows // inner), inner * image_bytes
    index = np.full((shard // inner, 2), ZARR_ABSENT, "<u8")
    index[:used, 0] = np.arange(used, dtype=np.uint64) * np.uint64(chunk_bytes)
    index[:used, 1] = chunk_bytes
    data = index.tobytes()
    return data + google_crc32c.value(data).to_bytes(4, "little")


def zarr_shard_key(shard: int, ndim: int) -> tuple[str, ...]:
    """Path parts of shard `shard` inside an array's folder: `c/i/0/0/0` (default key encoding, "/")."""
    return ("c", str(shard), *["0"] * (ndim - 1))


class RowSource(Protocol):
    """Rows of one split that a build task reads again: source files, PCam rows or finished shards.

    Everything in it is paths and plain values, so it pickles to any worker; nothing is open.
    """

    def __len__(self) -> int: ...

    def part(self, start: int, stop: int) -> RowSource:
        """Rows [start, stop), in order."""

    def blocks(self, shape: tuple[int, int, int], rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, images) for consecutive runs of at most `rows` images, in row order."""

    def fingerprint(self) -> list[tuple[int, ...]]:
        """What the rows' bytes depend on besides ids and labels (file sizes, mtimes, row numbers)."""
