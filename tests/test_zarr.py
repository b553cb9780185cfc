"""pcam.zarr as zarr's sharding codec writes it: stock zarr reads it, ArrayReader maps it, verify guards it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pcam_prep.loader import BatchLoader, ShardError, open_source
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.readers import ArrayReader
from pcam_prep.synth import write_kaggle
from pcam_prep.train.data import ResidentSplit
from pcam_prep.verify import verify

CHUNK_ROWS = 64  # 150 train images: shards of 64, 64, 22; inner chunks of 16, the last one padded


def digests(out: Path) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in json.loads((out / "manifest.json").read_text())["files"]}


@pytest.fixture(scope="module")
def sharded(kaggle_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    build(BuildConfig(src=kaggle_src, out=out, formats=("wds", "zarr"), shard_size=16, chunk_rows=CHUNK_ROWS,
                      folds=3, seed=1, workers=1))
    return out


def shard_file(out: Path, split: str, index: int) -> Path:
    return out / "pcam.zarr" / split / "x" / "c" / str(index) / "0" / "0" / "0"


@pytest.mark.parametrize("split,shard,inner", [("train", CHUNK_ROWS, 16), ("test", 40, 8)])  # 40 test images
def test_stock_zarr_reads_the_store_and_gives_the_shards_pixels(sharded: Path, split: str, shard, inner) -> None:
    x = zarr.open_group(str(sharded / "pcam.zarr"), mode="r")[f"{split}/x"]
    assert x.shards == (shard, 96, 96, 3) and x.chunks == (inner, 96, 96, 3)
    shards = open_source(sharded, split)
    np.testing.assert_array_equal(x[:], shards.take(np.arange(len(shards))))
    last = len(shards) - 1
    np.testing.assert_array_equal(x[last], shards.take(np.array([last]))[0])  # one row of the padded last chunk


def test_array_reader_gives_stock_zarrs_rows_for_random_indices(sharded: Path) -> None:
    x = zarr.open_group(str(sharded / "pcam.zarr"), mode="r")["train/x"]
    reader = ArrayReader(sharded / "pcam.zarr", "zarr", "train")
    rows = np.concatenate([np.random.default_rng(2).integers(0, len(reader), 200), [0, 63, 64, 127, 128, 149, 5, 5]])
    got = reader.take(rows, np.empty((len(rows), 96, 96, 3), np.uint8))
    assert reader._chunks, "the shards should be memory-mapped, not read through zarr"
    np.testing.assert_array_equal(got, np.stack([x[int(r)] for r in rows]))
    np.testing.assert_array_equal(reader.range(60, 150), x[60:150])
    unmapped = ArrayReader(sharded / "pcam.zarr", "zarr", "train", mapped=False)
    np.testing.assert_array_equal(unmapped.take(rows, np.empty_like(got)), got)  # through zarr (verify)
    assert unmapped._chunks is None
    np.testing.assert_array_equal(unmapped.range(60, 200), x[60:150])  # pread, across shards, clipped (stats)
    assert unmapped._shards and unmapped._checked == {0, 1, 2}


def test_loader_and_resident_split_read_the_shards_pixels(sharded: Path) -> None:
    wds, store = open_source(sharded, "train", [0, 2]), open_source(sharded, "train", [0, 2], "zarr")
    for ours, theirs in zip(BatchLoader(store, 32, seed=4), BatchLoader(wds, 32, seed=4)):
        np.testing.assert_array_equal(ours.images, theirs.images)
        assert ours.ids == theirs.ids
    resident = ResidentSplit(store, torch.device("cpu"))
    np.testing.assert_array_equal(resident.images.numpy(), wds.take(np.arange(len(wds))))


def test_a_rebuild_over_a_stale_partial_store_gives_the_same_bytes(sharded: Path, kaggle_src: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    junk = out / ".pcam.zarr.partial" / "train" / "x" / "c" / "0" / "0" / "0" / "0"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"left by a killed build")
    build(BuildConfig(src=kaggle_src, out=out, formats=("wds", "zarr"), shard_size=16, chunk_rows=CHUNK_ROWS,
                      folds=3, seed=1, workers=2, scheduler="threads"))
    assert digests(out) == digests(sharded)
    assert not list(out.rglob("*.partial"))
    assert verify(out).ok


@pytest.mark.parametrize("where", ["pixel", "index"])
def test_verify_and_the_loader_catch_a_flipped_byte_in_a_shard_file(sharded: Path, tmp_path: Path, where) -> None:
    out = tmp_path / "copy"
    shutil.copytree(sharded, out)
    shard = shard_file(out, "train", 1)
    data = bytearray(shard.read_bytes())
    data[100 if where == "pixel" else len(data) - 10] ^= 0x01  # row 64's pixels, or the shard's index
    shard.write_bytes(bytes(data))
    report = verify(out)
    assert any(p.startswith("checksum mismatch: pcam.zarr") for p in report.problems)
    if where == "pixel":  # inner chunks carry no checksum of their own: the manifest's sha256 and the shards do
        assert any("(row 64) differ between wds and zarr" in p for p in report.problems)
    else:
        assert any("zarr cannot read train/x" in p and "checksum" in p for p in report.problems)
        with pytest.raises(ShardError, match=r"c/1/0/0/0: the shard index fails its crc32c check"):
            open_source(out, "train", None, "zarr").take(np.array([0]))


def test_a_shard_file_of_the_wrong_size_is_refused_naming_it(sharded: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(sharded, out)
    shard = shard_file(out, "train", 2)
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(ShardError, match=r"c/2/0/0/0: \d+ bytes, expected \d+ for 22 images"):
        open_source(out, "train", None, "zarr").take(np.array([0]))
    unmapped = ArrayReader(out / "pcam.zarr", "zarr", "train", mapped=False)
    assert unmapped.range(0, 128).shape == (128, 96, 96, 3)  # shards 0 and 1 are whole
    with pytest.raises(ShardError, match=r"c/2/0/0/0: \d+ bytes, expected"):
        unmapped.range(120, 130)


def test_a_store_in_another_layout_is_read_through_zarr(sharded: Path, tmp_path: Path) -> None:
    """A store written before sharding (256-image Blosc chunks) still opens; it just reads through zarr."""
    out = tmp_path / "copy"
    shutil.copytree(sharded, out)
    group = zarr.open_group(str(out / "pcam.zarr"), mode="r+")
    pixels = group["train/x"][:]
    del group["train/x"]
    group.create_array("train/x", data=pixels, chunks=(CHUNK_ROWS, 96, 96, 3),
                       compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"))
    reader = ArrayReader(out / "pcam.zarr", "zarr", "train")
    rows = np.array([149, 0, 70, 70])
    np.testing.assert_array_equal(reader.take(rows, np.empty((4, 96, 96, 3), np.uint8)), pixels[rows])
    assert reader._chunks is False


@pytest.mark.slow
def test_parallel_pieces_own_whole_shards_and_give_the_same_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_kaggle(src, 2100, 20, seed=21)  # > 2048 rows: two Zarr pieces, written by two processes
    config = dict(src=src, formats=("wds", "zarr"), chunk_rows=100, folds=2)
    build(BuildConfig(out=tmp_path / "one", workers=1, scheduler="sync", **config))
    build(BuildConfig(out=tmp_path / "two", workers=2, scheduler="processes", **config))
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    x = zarr.open_group(str(tmp_path / "two" / "pcam.zarr"), mode="r")["train/x"]
    assert x.shards == (100, 96, 96, 3) and x.chunks == (4, 96, 96, 3)
    shards = open_source(tmp_path / "two", "train")
    np.testing.assert_array_equal(x[:], shards.take(np.arange(len(shards))))
    assert verify(tmp_path / "two").ok


@pytest.mark.parametrize("n", [600, 256, 40, 7])
def test_shard_files_written_directly_are_the_bytes_stock_zarr_writes(tmp_path: Path, n: int) -> None:
    """write_zarr_shard against zarr itself writing the same rows into the same array definition."""
    from pcam_prep.writers import arrays

    images = np.random.default_rng(n).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    ours = arrays.create_zarr(tmp_path / "ours.zarr", {"train": n}, (96, 96, 3), 256)
    theirs = arrays.create_zarr(tmp_path / "theirs.zarr", {"train": n}, (96, 96, 3), 256)
    rows = arrays.zarr_shard_rows(256, n)
    digests = dict(arrays.write_zarr_shard(ours, "train", s // rows, images[s : s + rows]) for s in range(0, n, rows))
    with zarr.config.set({"array.write_empty_chunks": True}):
        zarr.open_array(store=str(theirs), path="train/x", mode="r+")[:] = images
    files = sorted(p.relative_to(theirs).as_posix() for p in (theirs / "train/x/c").rglob("*") if p.is_file())
    assert sorted(digests) == files and len(files) == -(-n // rows)
    for rel in files:
        assert (ours / rel).read_bytes() == (theirs / rel).read_bytes(), rel
        assert digests[rel] == hashlib.sha256((ours / rel).read_bytes()).hexdigest()
    np.testing.assert_array_equal(zarr.open_array(store=str(ours), path="train/x", mode="r")[:], images)
