from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcam_prep import PcamPrepError
from pcam_prep.loader import BatchLoader, ShardError, ShardReader, batch_plan, open_source
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.schema import SampleLayout


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("split,folds", [("train", None), ("train", [1]), ("train", [0, 2]), ("test", None)])
def test_every_format_gives_the_same_rows(built: Path, fmt, split, folds) -> None:
    wds = open_source(built, split, folds, "wds")
    other = open_source(built, split, folds, fmt)
    assert list(wds.ids) == list(other.ids) and len(wds) > 0
    index = np.random.default_rng(0).permutation(len(wds))[:20]
    np.testing.assert_array_equal(wds.take(index), other.take(index))
    if split == "train":
        np.testing.assert_array_equal(wds.labels, other.labels)
    else:
        assert wds.labels is None and other.labels is None


@pytest.mark.parametrize("fmt", ["wds", "zarr", "hdf5"])
def test_take_gathers_into_a_given_buffer_and_names_bad_ones(built: Path, fmt: str) -> None:
    source = open_source(built, "train", None, fmt)
    index = np.array([len(source) - 1, 0, 5, 5])
    reference = np.stack([
        source.take(np.array([i]))[0] for i in index])  # row by row: no batching tricks involved
    buffer = np.zeros((4, *source.shape), np.uint8)
    assert source.take(index, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, reference)
    with pytest.raises(ValueError, match=r"shape \(4, 96, 96, 3\)"):
        source.take(index, out=np.zeros((3, *source.shape), np.uint8))


@pytest.mark.parametrize("codec", ["none", "lzf"])
def test_hdf5_rows_match_the_shards_whether_chunks_are_mapped_or_decoded(kaggle_src: Path, tmp_path: Path,
                                                                         codec: str) -> None:
    build(BuildConfig(src=kaggle_src, out=tmp_path, formats=("wds", "hdf5"), hdf5_codec=codec, chunk_rows=16,
                      workers=1))
    wds, h5 = open_source(tmp_path, "train"), open_source(tmp_path, "train", None, "hdf5")
    index = np.random.default_rng(1).permutation(len(wds))[:40]
    np.testing.assert_array_equal(h5.take(index), wds.take(index))
    assert bool(h5.reader._chunks) == (codec == "none")  # unfiltered chunks are memory-mapped; lzf goes through h5py


def test_a_source_that_reads_through_h5py_still_does_after_pickling(built: Path) -> None:
    source = pickle.loads(pickle.dumps(open_source(built, "train", None, "hdf5", mapped=False)))
    index = np.arange(5)
    np.testing.assert_array_equal(source.take(index), open_source(built, "train").take(index))
    assert not source.reader._chunks  # verify's reads must go through h5py in every process


def test_a_row_outside_the_split_is_named(built: Path) -> None:
    source = open_source(built, "train", [0])
    with pytest.raises(IndexError, match=f"{len(source)} rows"):
        source.take(np.array([0, len(source)]))


def test_batches_cover_an_epoch_exactly_and_match_the_images(built: Path) -> None:
    source = open_source(built, "train", [0, 1])
    loader = BatchLoader(source, 32, seed=3)
    seen = np.concatenate([b.index for b in loader])
    assert sorted(seen) == list(range(len(source)))
    batch = next(iter(loader))
    assert batch.images.dtype == np.uint8 and batch.images.shape[1:] == (96, 96, 3)
    np.testing.assert_array_equal(batch.images, source.take(batch.index))
    assert batch.ids == list(source.ids[batch.index])


def test_order_depends_only_on_seed_and_epoch_and_resumes_mid_epoch(built: Path) -> None:
    source = open_source(built, "train")
    a = [b.index for b in BatchLoader(source, 16, seed=1, epoch=2)]
    b = [b.index for b in BatchLoader(source, 16, seed=1, epoch=2)]
    c = [b.index for b in BatchLoader(source, 16, seed=1, epoch=3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    resumed = [b.index for b in BatchLoader(source, 16, seed=1, epoch=2, start_step=3)]
    assert all(np.array_equal(x, y) for x, y in zip(a[3:], resumed)) and len(resumed) == len(a) - 3


@given(n=st.integers(0, 500), bs=st.integers(1, 64), world=st.integers(1, 4), workers=st.integers(1, 3),
       seed=st.integers(0, 99))
def test_ranks_and_workers_split_an_epoch_without_overlap(n, bs, world, workers, seed) -> None:
    parts = [batch_plan(n, bs, seed=seed, rank=r, world_size=world, worker=w, num_workers=workers)
             for r in range(world) for w in range(workers)]
    flat = np.concatenate([np.concatenate(p) for p in parts if p] or [np.array([], int)])
    assert sorted(flat.tolist()) == list(range(n))
    assert all(len(b) <= bs for p in parts for b in p)


def _shard(built: Path) -> tuple[Path, dict]:
    import json

    manifest = json.loads((built / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["format"] == "wds" and f["split"] == "train")
    return built / entry["path"], entry


def test_a_flipped_byte_in_a_header_is_refused(built: Path, tmp_path: Path) -> None:
    path, entry = _shard(built)
    bad = tmp_path / "bad.tar"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01  # inside the first member's name
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="unexpected member"):
        ShardReader(bad, SampleLayout((96, 96, 3), True), entry["count"])


def test_a_pickle_member_is_refused(built: Path, tmp_path: Path) -> None:
    path, entry = _shard(built)
    bad = tmp_path / "pickle.tar"
    with tarfile.open(path) as src, tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as dst:
        members = src.getmembers()
        for m in members[:2]:
            dst.addfile(m, src.extractfile(m))
        payload = pickle.dumps({"evil": 1})
        info = tarfile.TarInfo(members[0].name.replace(".npy", ".pickle"))
        info.size = len(payload)
        dst.addfile(info, io.BytesIO(payload))
        for m in members[2:]:
            dst.addfile(m, src.extractfile(m))
    with pytest.raises(ShardError):
        ShardReader(bad, SampleLayout((96, 96, 3), True), entry["count"])


def test_an_object_npy_is_refused(built: Path, tmp_path: Path) -> None:
    path, entry = _shard(built)
    bad = tmp_path / "object.tar"
    shutil.copy(path, bad)
    data = bytearray(bad.read_bytes())
    at = data.index(b"|u1")
    data[at : at + 3] = b"|O\x20"
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="npy header"):
        ShardReader(bad, SampleLayout((96, 96, 3), True), entry["count"])


def test_a_label_other_than_0_or_1_is_refused(built: Path, tmp_path: Path) -> None:
    path, entry = _shard(built)
    layout = SampleLayout((96, 96, 3), True)
    data = bytearray(path.read_bytes())
    data[layout.label_offset] = ord("7")
    bad = tmp_path / "label.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="not 0/1"):
        ShardReader(bad, layout, entry["count"])


def test_bad_requests_name_the_bad_value(built: Path) -> None:
    with pytest.raises(PcamPrepError, match=r"fold\(s\) \[9\]"):
        open_source(built, "train", [9])
    with pytest.raises(PcamPrepError, match="split must be"):
        open_source(built, "valid")
    with pytest.raises(PcamPrepError, match="no manifest"):
        open_source(built / "wds")


def test_sources_pickle_without_their_maps_or_handles(built: Path) -> None:
    for fmt in ("wds", "zarr", "hdf5"):
        source = open_source(built, "train", None, fmt)
        source.take(np.arange(3))
        clone = pickle.loads(pickle.dumps(source))
        np.testing.assert_array_equal(clone.take(np.arange(3)), source.take(np.arange(3)))
        assert len(pickle.dumps(source)) < 200_000  # no pixels travel


def test_state_dict_resumes_mid_epoch_with_the_batches_not_yet_seen(built: Path) -> None:
    source = open_source(built, "train")
    whole = [b.index for b in BatchLoader(source, 8, seed=5, epoch=2)]
    loader = BatchLoader(source, 8, seed=5, epoch=2)
    it = iter(loader)
    first = [next(it).index for _ in range(3)]
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["step"] == 3
    fresh = BatchLoader(source, 8, seed=5)
    fresh.load_state_dict(state)
    rest = [b.index for b in fresh]
    assert len(first) + len(rest) == len(whole)
    for got, want in zip(first + rest, whole):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="batch_size=8"):
        BatchLoader(source, 16, seed=5).load_state_dict(state)
