"""Unfiltered HDF5 chunks written in place by parallel tasks: stock h5py reads them, the bytes are deterministic."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest

from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.writers import arrays


def test_chunks_written_in_place_read_back_through_h5py(tmp_path) -> None:
    images = np.random.default_rng(3).integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    tmp = arrays.create_hdf5(tmp_path / "a.h5", (8, 8, 3), 16, {"train": (37, {"y": np.zeros(37, np.uint8)})})
    offsets, per = arrays.hdf5_chunk_offsets(tmp, "train")
    assert len(offsets) == 3 and per == 16
    for start in (32, 0, 16):  # any order, as tasks finish
        arrays.write_hdf5_chunks(tmp, offsets, 16, start, images[start : start + 16])
    with h5py.File(tmp) as fh:
        np.testing.assert_array_equal(fh["train/x"][:], images)
        assert fh["train/y"].shape == (37,)
    with pytest.raises(ValueError, match="chunk boundary"):
        arrays.write_hdf5_chunks(tmp, offsets, 16, 5, images[5:21])


def test_a_split_smaller_than_a_chunk_keeps_the_datasets_after_it(tmp_path) -> None:
    images = np.random.default_rng(4).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    ids = np.array([f"id{i}" for i in range(5)])
    tmp = arrays.create_hdf5(tmp_path / "a.h5", (8, 8, 3), 16, {"train": (5, {"id": ids})})
    offsets, per = arrays.hdf5_chunk_offsets(tmp, "train")
    assert per == 5  # the file's chunk, not chunk_rows
    arrays.write_hdf5_chunks(tmp, offsets, per, 0, images)
    with h5py.File(tmp) as fh:
        np.testing.assert_array_equal(fh["train/x"][:], images)
        assert [i.decode() for i in fh["train/id"][:]] == list(ids)


def test_filtered_files_are_not_written_in_place(tmp_path) -> None:
    tmp = arrays.create_hdf5(tmp_path / "a.h5", (8, 8, 3), 16, {"train": (20, {})}, codec="lzf")
    assert arrays.hdf5_chunk_offsets(tmp, "train") is None


def test_the_file_is_the_same_bytes_with_one_worker_or_two(kaggle_src, tmp_path) -> None:
    digests = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        build(BuildConfig(src=kaggle_src, out=out, formats=("wds", "hdf5"), chunk_rows=16, workers=workers))
        digests.append(hashlib.sha256((out / "pcam.h5").read_bytes()).hexdigest())
        with h5py.File(out / "pcam.h5") as fh:
            assert fh["train/x"].chunks[0] == 16 and not fh["train/x"].compression
    assert digests[0] == digests[1]


class _Rows:
    """A RowSource over an in-memory array."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def part(self, start: int, stop: int) -> _Rows:
        return _Rows(self.images[start:stop])

    def blocks(self, shape, rows):
        for start in range(0, len(self.images), rows):
            yield start, self.images[start : start + rows].copy()


def test_the_digest_from_the_sources_is_the_files_sha256(tmp_path) -> None:
    rng = np.random.default_rng(5)
    shape = (32, 32, 3)  # 16 rows = 48 KiB: O_DIRECT-aligned chunks, as a real build's are
    images = {"train": rng.integers(0, 256, (70, *shape), np.uint8), "test": rng.integers(0, 256, (9, *shape), np.uint8)}
    columns = {"train": (70, {"id": np.array([f"t{i}" for i in range(70)]), "y": rng.integers(0, 2, 70, np.uint8)}),
               "test": (9, {"id": np.array([f"s{i}" for i in range(9)])})}
    tmp = arrays.create_hdf5(tmp_path / "a.h5", shape, 16, columns)
    chunks = {split: arrays.hdf5_chunk_offsets(tmp, split) for split in images}
    sources = {split: _Rows(x) for split, x in images.items()}
    before = arrays.hdf5_digest(tmp, chunks, sources, shape)  # the build hashes while the chunks are written
    for split, x in images.items():
        offsets, per = chunks[split]
        for start in range(0, len(x), per):
            arrays.write_hdf5_chunks(tmp, offsets, per, start, x[start : start + per])
    assert before == hashlib.sha256(tmp.read_bytes()).hexdigest()
    with h5py.File(tmp) as fh:
        np.testing.assert_array_equal(fh["test/x"][:], images["test"])
    images["train"][69, 0, 0, 0] ^= 1  # one pixel of the zero-padded edge chunk
    assert arrays.hdf5_digest(tmp, chunks, sources, shape) != before
