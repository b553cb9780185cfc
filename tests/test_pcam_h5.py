"""PatchCamelyon HDF5 files as a source: splits, sha1 ids, duplicates, chunked reads, torchvision names."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import webdataset as wds
import zarr
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from pcam_prep import PcamPrepError
from pcam_prep.cli import main
from pcam_prep.loader import open_source
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.pipeline.dedup import dedup
from pcam_prep.schema import PCAM_SPLITS
from pcam_prep.sources import pcam_h5
from pcam_prep.synth import write_pcam_h5
from pcam_prep.verify import verify

from .corpus import image

SPLITS = ("train", "valid", "test")
TV_NAMES = {"train": "train", "valid": "val", "test": "test"}


def sha1(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def outputs_digest(out: Path) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in manifest(out)["files"]}


def read_pcam(src: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(src / pcam_h5.pcam_file(split, "x")) as fx, h5py.File(src / pcam_h5.pcam_file(split, "y")) as fy:
        return fx["x"][:], fy["y"][:].reshape(-1)


def write_pcam(folder: Path, split: str, images: list[np.ndarray], labels: list[int], wsi: list[str] | None = None):
    """One split in the PCam layout, x chunked and compressed like the real files may be."""
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / pcam_h5.pcam_file(split, "x"), "w") as fh:
        fh.create_dataset("x", data=np.stack(images), chunks=(min(4, len(images)), 96, 96, 3), compression="gzip")
    with h5py.File(folder / pcam_h5.pcam_file(split, "y"), "w") as fh:
        fh.create_dataset("y", data=np.array(labels, np.uint8).reshape(-1, 1, 1, 1))
    if wsi is not None:
        pd.DataFrame({"coord_y": 0, "coord_x": 0, "tumor_patch": False, "center_tumor_patch": np.array(labels) == 1,
                      "wsi": wsi}).to_csv(folder / pcam_h5.pcam_file(split, "meta", "csv"))


@pytest.fixture(scope="module")
def pcam_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic PCam files: 60 train (2 exact duplicates), 20 valid (1 copied from train), 20 test."""
    root = tmp_path_factory.mktemp("pcam")
    write_pcam_h5(root, 60, 20, 20, seed=4)
    return root


@pytest.fixture(scope="module")
def pcam_built(pcam_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pcam-built")
    build(BuildConfig(src=pcam_src, out=out, shard_size=16, chunk_rows=8, folds=3, seed=1, workers=1,
                      torchvision_names=True))
    return out


def test_every_format_holds_the_source_pixels_bit_exact_under_sha1_ids(pcam_src: Path, pcam_built: Path) -> None:
    for split in SPLITS:
        images, labels = read_pcam(pcam_src, split)
        source = {sha1(img): (img, int(y)) for img, y in zip(images, labels)}
        urls = [str(pcam_built / f["path"]) for f in manifest(pcam_built)["files"]
                if f["format"] == "wds" and f["split"] == split]
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
        ids = [s["__key__"] for s in samples]
        z = zarr.open_group(str(pcam_built / "pcam.zarr"), mode="r")
        tv = pcam_built / "pcam"
        with h5py.File(pcam_built / "pcam.h5") as h5, \
                h5py.File(tv / f"camelyonpatch_level_2_split_{TV_NAMES[split]}_x.h5") as tx, \
                h5py.File(tv / f"camelyonpatch_level_2_split_{TV_NAMES[split]}_y.h5") as ty:
            assert ids == list(z[f"{split}/id"][:]) == [i.decode() for i in h5[f"{split}/id"][:]]
            assert len(set(ids)) == len(ids) and set(ids) <= set(source)
            for row, sample in enumerate(samples):
                img, label = source[sample["__key__"]]
                assert sha1(sample["npy"]) == sample["__key__"]
                for pixels in (sample["npy"], z[f"{split}/x"][row], h5[f"{split}/x"][row], tx["x"][row]):
                    np.testing.assert_array_equal(pixels, img)
                assert sample["cls"] == label == z[f"{split}/y"][row] == h5[f"{split}/y"][row] == ty["y"][row, 0, 0, 0]


def test_pcam_splits_are_kept_labelled_with_their_counts(pcam_src: Path, pcam_built: Path) -> None:
    m = manifest(pcam_built)
    assert m["source_layout"] == "pcam-h5"
    assert list(m["splits"]) == list(SPLITS)
    digests = {split: [sha1(img) for img in read_pcam(pcam_src, split)[0]] for split in SPLITS}
    held_out = set(digests["valid"]) | set(digests["test"])
    expected = {"train": len(set(digests["train"]) - held_out), "valid": 20, "test": 20}
    assert expected["train"] == 57  # 60 rows - 2 exact copies - 1 copied into valid
    for split in SPLITS:
        entry = m["splits"][split]
        assert entry["count"] == expected[split] and entry["labelled"] is True
        assert entry["folded"] is (split == "train")
        for fmt in ("wds", "zarr", "hdf5"):
            source = open_source(pcam_built, split, None, fmt)
            assert len(source) == entry["count"] and int(source.labels.sum()) == entry["positives"]
    assert sum(c["count"] for c in m["folds"]["counts"]) == expected["train"]
    with pytest.raises(PcamPrepError, match="train, valid, test"):
        open_source(pcam_built, "holdout")


def test_verify_passes_on_a_pcam_build(pcam_built: Path) -> None:
    report = verify(pcam_built)
    assert report.ok, report.problems
    assert report.samples == sum(s["count"] for s in manifest(pcam_built)["splits"].values())


def test_stats_are_those_of_the_kept_train_images(pcam_built: Path) -> None:
    pixels = zarr.open_group(str(pcam_built / "pcam.zarr"), mode="r")["train/x"][:]
    flat = pixels.reshape(-1, 3).astype(np.float64) / 255
    stats = manifest(pcam_built)["stats"]
    np.testing.assert_allclose(stats["mean"], flat.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], flat.std(axis=0), rtol=1e-9)


def test_stats_table_lists_every_pcam_split_with_its_labels(pcam_built: Path) -> None:
    from click.testing import CliRunner

    from pcam_prep.cli import main

    result = CliRunner().invoke(main, ["stats", str(pcam_built)])
    assert result.exit_code == 0, result.output
    rows: dict[str, list[str]] = {}
    for line in result.output.splitlines():  # the splits table comes first; the stain table repeats the names
        if line.strip():
            rows.setdefault(line.split()[0], line.split()[1:])
    for split, counts in manifest(pcam_built)["splits"].items():
        assert rows[split][:3] == [f"{counts['count']:,}", f"{counts['negatives']:,}", f"{counts['positives']:,}"]


def test_wsi_groups_from_the_meta_csv_never_span_folds(pcam_src: Path, pcam_built: Path) -> None:
    meta = pd.read_csv(pcam_src / pcam_h5.pcam_file("train", "meta", "csv"))
    ids = [sha1(img) for img in read_pcam(pcam_src, "train")[0]]
    wsi = dict(reversed(list(zip(ids, meta["wsi"]))))  # the first row of a duplicate is the one kept
    z = zarr.open_group(str(pcam_built / "pcam.zarr"), mode="r")
    frame = pd.DataFrame({"id": z["train/id"][:], "fold": z["train/fold"][:]})
    frame["wsi"] = frame["id"].map(wsi)
    assert frame["wsi"].notna().all()
    assert (frame.groupby("wsi")["fold"].nunique() == 1).all()
    assert set(frame["fold"]) == {0, 1, 2}
    folds = manifest(pcam_built)["folds"]
    assert folds["grouped"] and folds["group_by"] == "wsi"


@pytest.fixture(scope="module")
def messy_pcam(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Every kind of duplicate PCam has, plus a blank patch and a label that is not 0/1."""
    root = tmp_path_factory.mktemp("messy-pcam")
    imgs = {name: image(seed) for seed, name in enumerate("ABCDEFGHIJKLM")}
    train = [*"ABCDEFGHIJ", "A", "B"]
    train_labels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0]  # second A agrees, second B does not
    blank = np.zeros((96, 96, 3), np.uint8)
    write_pcam(root, "train", [imgs[n] for n in train] + [blank, imgs["M"]], train_labels + [0, 2],
               [f"slide{i % 3}" for i in range(14)])
    write_pcam(root, "valid", [imgs[n] for n in "KLKC"], [1, 0, 1, 0])
    write_pcam(root, "test", [image(99), imgs["D"]], [0, 1])
    ids = {name: sha1(img) for name, img in imgs.items()} | {"blank": sha1(blank)}
    return root, ids


def test_duplicates_conflicts_and_leakage_are_reported(messy_pcam, tmp_path: Path) -> None:
    root, ids = messy_pcam
    out = tmp_path / "out"
    m = build(BuildConfig(src=root, out=out, formats=("zarr",), folds=2, workers=1)).manifest
    dups = pd.read_csv(out / "duplicates.csv", dtype=str, keep_default_na=False)
    rows = sorted(zip(dups["kept"], dups["dropped"], dups["kind"]))
    assert rows == sorted([
        (ids["A"], ids["A"], "exact"),  # within train: one kept
        ("", ids["B"], "conflicting-label"), ("", ids["B"], "conflicting-label"),  # all dropped
        (ids["K"], ids["K"], "exact"),  # within valid: the first kept, so ids stay unique
        (ids["C"], ids["C"], "train-valid"), (ids["D"], ids["D"], "train-test"),  # train copy dropped
    ])
    assert m["duplicates"]["by_kind"] == {"conflicting-label": 2, "exact": 2, "train-test": 1, "train-valid": 1}
    assert m["duplicates"]["leaked_images"] == {"valid": 1, "test": 1}
    z = zarr.open_group(str(out / "pcam.zarr"), mode="r")
    assert sorted(z["train/id"][:]) == sorted(ids[n] for n in "AEFGHIJ")
    assert sorted(z["valid/id"][:]) == sorted(ids[n] for n in "KLC")
    assert list(z["valid/y"][:]) == [dict(zip((ids[n] for n in "KLC"), (1, 0, 0)))[i] for i in z["valid/id"][:]]

    rejects = pd.read_csv(out / "rejects.csv", dtype=str, keep_default_na=False)
    got = {r.reason: (r.id, r.path, r.detail) for r in rejects.itertuples()}
    assert got["blank"] == (ids["blank"], "camelyonpatch_level_2_split_train_x.h5[12]", "every pixel is 0")
    assert got["bad-label"] == (ids["M"], "camelyonpatch_level_2_split_train_x.h5[13]", "label 2")


def test_pcam_ids_equal_the_kaggle_ids_of_the_same_patches(tmp_path: Path) -> None:
    images, labels = [image(100 + i) for i in range(12)], [i % 2 for i in range(12)]
    write_pcam(tmp_path / "pcam", "train", images, labels)
    (tmp_path / "kaggle" / "train").mkdir(parents=True)
    for img in images:
        tifffile.imwrite(tmp_path / "kaggle" / "train" / f"{sha1(img)}.tif", img)
    pd.DataFrame({"id": [sha1(i) for i in images], "label": labels}).to_csv(tmp_path / "kaggle" / "train_labels.csv",
                                                                            index=False)
    for layout in ("pcam", "kaggle"):
        build(BuildConfig(src=tmp_path / layout, out=tmp_path / f"out-{layout}", formats=("hdf5",), folds=2, workers=1))
    with h5py.File(tmp_path / "out-pcam" / "pcam.h5") as a, h5py.File(tmp_path / "out-kaggle" / "pcam.h5") as b:
        for key in ("train/id", "train/y", "train/fold", "train/x"):
            np.testing.assert_array_equal(a[key][:], b[key][:])


def test_x_is_read_in_row_ranges_never_whole(pcam_src: Path, tmp_path: Path, monkeypatch) -> None:
    n = {split: len(read_pcam(pcam_src, split)[1]) for split in SPLITS}
    ranges, reads = [], []
    read_range = pcam_h5.read_range
    monkeypatch.setattr(pcam_h5, "read_range", lambda path, start, stop: ranges.append((path, start, stop))
                        or read_range(path, start, stop))
    monkeypatch.setattr(pcam_h5, "_SPAN_ROWS", 16)  # a write-stage read spans at most 16 rows
    getitem = h5py.Dataset.__getitem__

    def spy(self, key):
        data = getitem(self, key)
        if Path(self.file.filename).parent == pcam_src and self.name == "/x":
            reads.append((Path(self.file.filename).name, len(data)))
        return data

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    small = tmp_path / "small"
    build(BuildConfig(src=pcam_src, out=small, formats=("zarr", "hdf5"), shard_size=16, chunk_rows=8, folds=3,
                      workers=1, batch_size=7))
    for split in SPLITS:
        spans = sorted((start, stop) for path, start, stop in ranges if path.endswith(f"_{split}_x.h5"))
        assert spans == [(s, min(s + 7, n[split])) for s in range(0, n[split], 7)]
    assert reads and max(rows for _, rows in reads) <= 16 < min(n.values())
    monkeypatch.undo()
    big = tmp_path / "big"
    build(BuildConfig(src=pcam_src, out=big, formats=("zarr", "hdf5"), shard_size=16, chunk_rows=8, folds=3,
                      workers=2, scheduler="processes", batch_size=1000))
    assert outputs_digest(small) == outputs_digest(big)


def test_torchvision_names_keys_shapes_and_dtypes(pcam_built: Path) -> None:
    folder = pcam_built / "pcam"
    expected = {f"camelyonpatch_level_2_split_{s}_{m}.h5" for s in ("train", "val", "test") for m in "xy"}
    assert {p.name for p in folder.iterdir()} == expected
    counts = {s: e["count"] for s, e in manifest(pcam_built)["splits"].items()}
    for split, name in TV_NAMES.items():
        with h5py.File(folder / f"camelyonpatch_level_2_split_{name}_x.h5") as fx, \
                h5py.File(folder / f"camelyonpatch_level_2_split_{name}_y.h5") as fy:
            assert list(fx) == ["x"] and list(fy) == ["y"]
            assert fx["x"].shape == (counts[split], 96, 96, 3) and fx["x"].dtype == np.uint8
            assert fy["y"].shape == (counts[split], 1, 1, 1) and fy["y"].dtype == np.uint8
    listed = [(f["path"], f["split"], f["count"]) for f in manifest(pcam_built)["files"]
              if f["format"] == "torchvision-h5"]
    assert sorted(listed) == sorted((f"pcam/camelyonpatch_level_2_split_{TV_NAMES[s]}_{m}.h5", s, counts[s])
                                    for s in SPLITS for m in "xy")


def test_torchvision_names_from_kaggle_write_the_labelled_split_only(kaggle_src: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        m = build(BuildConfig(src=kaggle_src, out=out, formats=("wds",), folds=2, workers=1,
                              torchvision_names=True)).manifest
    assert sorted(p.name for p in (out / "pcam").iterdir()) == [
        "camelyonpatch_level_2_split_train_x.h5", "camelyonpatch_level_2_split_train_y.h5"]
    assert "unlabelled split(s) test" in caplog.text
    assert m["splits"]["test"]["labelled"] is False and m["splits"]["train"]["labelled"] is True
    assert verify(out).ok
    build(BuildConfig(src=kaggle_src, out=out, formats=("wds",), folds=2, workers=1))
    assert not (out / "pcam").exists()  # not asked for again: the stale files go


@pytest.mark.parametrize("remove,message", [
    ("valid_y.h5", "valid split needs camelyonpatch_level_2_split_valid_x.h5 and camelyonpatch_level_2_split_valid_y"),
    ("train_x.h5", "camelyonpatch_level_2_split_train_x.h5 not found"),
])
def test_a_split_missing_a_file_is_a_clear_error(pcam_src: Path, tmp_path: Path, remove, message) -> None:
    src = tmp_path / "src"
    shutil.copytree(pcam_src, src)
    (src / f"camelyonpatch_level_2_split_{remove}").unlink()
    with pytest.raises(PcamPrepError, match=message):
        build(BuildConfig(src=src, out=tmp_path / "out", workers=1))


def test_a_still_gzipped_file_says_so_and_absent_splits_are_fine(pcam_src: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(pcam_src, src)
    y = src / pcam_h5.pcam_file("test", "y")
    y.rename(y.with_name(y.name + ".gz"))
    with pytest.raises(PcamPrepError, match="gunzip"):
        build(BuildConfig(src=src, out=tmp_path / "out", workers=1))
    for p in src.glob("*_test_*"):
        p.unlink()
    m = build(BuildConfig(src=src, out=tmp_path / "out", formats=("hdf5",), workers=1)).manifest
    assert list(m["splits"]) == ["train", "valid"]


def test_x_of_the_wrong_shape_is_a_clear_error(tmp_path: Path) -> None:
    write_pcam(tmp_path, "train", [image(1)] * 2, [0, 1])
    with h5py.File(tmp_path / pcam_h5.pcam_file("train", "x"), "w") as fh:
        fh.create_dataset("x", data=np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(PcamPrepError, match=r"\(2, 64, 64, 3\) uint8, expected \(N, 96, 96, 3\)"):
        build(BuildConfig(src=tmp_path, out=tmp_path / "out", workers=1))


def test_synth_pcam_is_deterministic_and_holds_the_promised_duplicates(tmp_path: Path) -> None:
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(main, ["synth", str(tmp_path / name), "--layout", "pcam-h5", "--train", "12",
                                      "--valid", "4", "--test", "3", "--seed", "7"])
        assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(pcam_h5.pcam_file(s, m, e) for s in SPLITS for m, e in (("x", "h5"), ("y", "h5"),
                                                                                   ("meta", "csv")))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, valid = read_pcam(tmp_path / "a", "train"), read_pcam(tmp_path / "a", "valid")
    ids = [sha1(i) for i in train[0]]
    assert ids[-1] == ids[0] and ids[-2] == ids[1] and len(set(ids)) == 10
    assert sha1(valid[0][0]) == ids[2] and valid[1][0] == train[1][2]
    meta = pd.read_csv(tmp_path / "a" / pcam_h5.pcam_file("train", "meta", "csv"))
    assert len(meta) == 12 and 1 < meta["wsi"].nunique() <= 6


def test_cli_builds_and_verifies_a_pcam_folder(tmp_path: Path) -> None:
    runner = CliRunner()
    runner.invoke(main, ["synth", str(tmp_path / "src"), "--layout", "pcam-h5", "--train", "20", "--valid", "5",
                         "--test", "5"])
    result = runner.invoke(main, ["build", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                                  "--folds", "2", "--workers", "1", "--torchvision-names"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "train-valid: 1" in result.output
    result = runner.invoke(main, ["verify", str(tmp_path / "out")])
    assert result.exit_code == 0 and result.output.startswith("OK"), result.output
    result = runner.invoke(main, ["synth", str(tmp_path / "k"), "--valid", "3"])
    assert result.exit_code != 0 and "--layout pcam-h5" in result.output


_digest = st.sampled_from("abcdefgh")


@settings(max_examples=60, deadline=None)
@given(train=st.lists(st.tuples(_digest, st.integers(0, 1)), max_size=12),
       valid=st.lists(_digest, max_size=6), test=st.lists(_digest, max_size=6))
def test_dedup_leaves_unique_ids_and_no_leakage(train, valid, test) -> None:
    """PCam ids are digests: whatever the duplicates, each split's ids end unique and train leaks nowhere."""
    frames = {"train": pd.DataFrame({"id": [d for d, _ in train], "digest": [d for d, _ in train],
                                     "label": [y for _, y in train]}, columns=["id", "digest", "label"])}
    for name, rows in (("valid", valid), ("test", test)):
        frames[name] = pd.DataFrame({"id": rows, "digest": rows, "label": 0}, columns=["id", "digest", "label"])
    result = dedup(frames, PCAM_SPLITS)
    conflicting = {d for d in frames["train"]["digest"] if len({y for e, y in train if e == d}) > 1}
    expected = {"train": {d for d, _ in train} - conflicting - set(valid) - set(test), "valid": set(valid),
                "test": set(test)}
    for name, kept in result.kept.items():
        assert kept["id"].is_unique and set(kept["id"]) == expected[name]
    assert len(result.duplicates) == sum(len(frames[s]) - len(result.kept[s]) for s in frames)
    assert len(result.dropped) == len(frames["train"]) - len(result.train)


def test_source_checksums_against_torchvisions_published_md5s() -> None:
    from pcam_prep.sources import pcam_md5

    published = pcam_md5.PUBLISHED_MD5
    valid_x, test_x = (f"camelyonpatch_level_2_split_{s}_x.h5.gz" for s in ("valid", "test"))
    assert pcam_md5.check(valid_x, published[valid_x])["status"] == "match"
    swapped = pcam_md5.check(valid_x, published[test_x])  # the basveeling README's mix-up, as a file on disk
    assert swapped["status"] == "mismatch" and test_x in swapped["note"]
    assert pcam_md5.check(valid_x, "0" * 32)["note"] == "corrupt or not the official file"
    assert pcam_md5.check("camelyonpatch_level_2_split_valid_x.h5", "0" * 32)["status"] == "unpublished"
    assert published[valid_x] == "d5b63470df7cfa627aeec8b9dc0c066e"  # torchvision's value, not the README's


def test_every_pcam_source_file_is_sized_and_md5d_beside_the_decode(pcam_src: Path, tmp_path: Path, caplog) -> None:
    src = tmp_path / "src"
    shutil.copytree(pcam_src, src)
    packed = src / "camelyonpatch_level_2_split_valid_y.h5.gz"
    with open(src / "camelyonpatch_level_2_split_valid_y.h5", "rb") as raw, gzip.open(packed, "wb") as gz:
        gz.write(raw.read())  # a kept download: checked against the published MD5 (and it is not the official one)
    events: list[tuple[str, int, int]] = []
    with caplog.at_level(logging.WARNING, logger="pcam_prep"):
        build(BuildConfig(src=src, out=tmp_path / "out", formats=("wds",), folds=2, workers=2, batch_size=8),
              progress=lambda stage, done, total: events.append((stage, done, total)))
    record = manifest(tmp_path / "out")["source_files"]
    files = {f["path"]: f for f in record["files"]}
    on_disk = sorted(p.name for p in src.iterdir())
    assert sorted(files) == on_disk  # x, y, meta of every split, and the .gz
    for name, entry in files.items():
        data = (src / name).read_bytes()
        assert entry["size"] == len(data) and entry["md5"] == hashlib.md5(data).hexdigest()
    assert files[packed.name]["status"] == "mismatch" and files[packed.name]["published_md5"] == \
        "2b85f58b927af9964a4c15b8f7e8f179"
    assert {f["status"] for n, f in files.items() if n != packed.name} == {"unpublished"}
    assert "valid_y.h5.gz: MD5" in caplog.text and "is not the published 2b85f58b" in caplog.text
    assert any(stage == "md5" for stage, _, _ in events)  # hashed as tasks with a bar of their own
