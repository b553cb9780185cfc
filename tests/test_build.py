from __future__ import annotations

import csv
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import webdataset as wds
import zarr

from pcam_prep.files import sha256_file, sha256_tree
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig

from .corpus import image, write_bad


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def stock_wds(out: Path, split: str) -> list[dict]:
    files = [f for f in manifest(out)["files"] if f["format"] == "wds" and f["split"] == split]
    urls = [str(out / f["path"]) for f in files]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()) if urls else []


def test_pixels_round_trip_bit_exact_to_every_format(built: Path, kaggle_src: Path) -> None:
    samples = stock_wds(built, "train")
    ids = [s["__key__"] for s in samples]
    z = zarr.open_group(str(built / "pcam.zarr"), mode="r")
    with h5py.File(built / "pcam.h5", "r") as h5:
        assert list(z["train/id"][:]) == ids == [i.decode() for i in h5["train/id"][:]]
        for row, sample in enumerate(samples):
            source = tifffile.imread(kaggle_src / "train" / f"{sample['__key__']}.tif")
            np.testing.assert_array_equal(sample["npy"], source)
            np.testing.assert_array_equal(z["train/x"][row], source)
            np.testing.assert_array_equal(h5["train/x"][row], source)
        labels = [s["cls"] for s in samples]
        assert labels == list(z["train/y"][:]) == list(h5["train/y"][:])
        np.testing.assert_array_equal(z["train/fold"][:], h5["train/fold"][:])
        test_ids = sorted(p.stem for p in (kaggle_src / "test").iterdir())
        assert list(z["test/id"][:]) == test_ids
        for row, sample_id in enumerate(test_ids):
            source = tifffile.imread(kaggle_src / "test" / f"{sample_id}.tif")
            np.testing.assert_array_equal(z["test/x"][row], source)
            np.testing.assert_array_equal(h5["test/x"][row], source)
    assert [s["__key__"] for s in stock_wds(built, "test")] == test_ids


def test_train_shards_hold_one_fold_each_in_manifest_order(built: Path) -> None:
    z = zarr.open_group(str(built / "pcam.zarr"), mode="r")
    fold_of = dict(zip(z["train/id"][:], z["train/fold"][:]))
    for entry in manifest(built)["files"]:
        if entry["format"] == "wds" and entry["split"] == "train":
            with tarfile.open(built / entry["path"]) as tar:
                keys = {m.name.rsplit(".", 1)[0] for m in tar.getmembers()}
            assert {fold_of[k] for k in keys} == {entry["fold"]}
            assert len(keys) == entry["count"]


def test_tar_cli_lists_the_shards(built: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("no tar binary")
    shard = next((built / "wds").glob("train-*.tar"))
    names = subprocess.run(["tar", "-tf", str(shard)], check=True, capture_output=True, text=True).stdout.split()
    assert names[0].endswith(".npy") and names[1].endswith(".cls")


def test_manifest_describes_everything(built: Path) -> None:
    m = manifest(built)
    assert m["image_shape"] == [96, 96, 3]
    assert m["splits"]["train"]["count"] == 150 and m["splits"]["test"]["count"] == 40
    assert m["folds"]["k"] == 3 and m["folds"]["seed"] == 1
    assert sum(f["count"] for f in m["folds"]["counts"]) == 150
    assert sum(f["positives"] for f in m["folds"]["counts"]) == m["splits"]["train"]["positives"]
    assert m["rejects"]["count"] == 0 and m["duplicates"]["count"] == 0
    assert m["ids"]["sha1_mismatch"] == 0
    assert m["versions"]["zarr"].startswith("3")
    for entry in m["files"]:
        path = built / entry["path"]
        digest = sha256_tree(path) if path.is_dir() else sha256_file(path)
        assert digest == entry["sha256"], entry["path"]
    formats = {f["format"] for f in m["files"]}
    assert formats == {"wds", "zarr", "hdf5", "csv"}
    assert not list(built.rglob("*.partial"))


def test_stats_equal_a_numpy_reference(built: Path, kaggle_src: Path) -> None:
    labels = pd.read_csv(kaggle_src / "train_labels.csv")
    pixels = np.stack([tifffile.imread(kaggle_src / "train" / f"{i}.tif") for i in labels["id"]])
    flat = pixels.reshape(-1, 3).astype(np.float64) / 255
    stats = manifest(built)["stats"]
    # numpy's float64 reduction carries ~1e-11 of rounding; the manifest's figures are exact
    np.testing.assert_allclose(stats["mean"], flat.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], flat.std(axis=0), rtol=1e-9)


@pytest.fixture(scope="module")
def messy(kaggle_src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The clean set plus duplicates, conflicts, leakage and every kind of bad file."""
    root = tmp_path_factory.mktemp("messy")
    shutil.copytree(kaggle_src, root, dirs_exist_ok=True)
    labels = pd.read_csv(root / "train_labels.csv", dtype=str)
    first, second, third = labels.iloc[0], labels.iloc[1], labels.iloc[2]
    shutil.copy(root / "train" / f"{first.id}.tif", root / "train" / "copy-exact.tif")
    shutil.copy(root / "train" / f"{second.id}.tif", root / "train" / "copy-conflict.tif")
    shutil.copy(root / "train" / f"{third.id}.tif", root / "test" / "leaked.tif")
    flipped = "1" if second.label == "0" else "0"
    bad = write_bad(root / "train")
    extra = [("copy-exact", first.label), ("copy-conflict", flipped), ("no-such-file", "1"),
             ("bad-label-row", "2"), ("../../etc/passwd", "1")]
    extra += [(stem, "0") for stem in bad]
    # a valid image with a label that isn't 0/1, and a valid image with no label row
    tifffile.imwrite(root / "train" / "bad-label-row.tif", image(11))
    tifffile.imwrite(root / "train" / "unlabelled.tif", image(12))
    (root / "train" / "README.txt").write_text("not an image")
    (root / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with open(root / "train_labels.csv", "a", newline="") as fh:
        csv.writer(fh).writerows(extra)
    expected = {"first": first.id, "second": second.id, "third": third.id, "bad": bad}
    return root, expected


def test_messy_input_is_reported_and_nothing_bad_is_kept(messy, tmp_path: Path) -> None:
    root, expected = messy
    out = tmp_path / "out"
    summary = build(BuildConfig(src=root / "train", out=out, formats=("zarr",), folds=2, workers=1))
    rejects = pd.read_csv(out / "rejects.csv", dtype=str, keep_default_na=False)
    reason = dict(zip(rejects["id"], rejects["reason"]))
    for stem, why in expected["bad"].items():
        assert reason[stem] == why
    assert reason["no-such-file"] == "missing-file"
    assert reason["bad-label-row"] == "bad-label"
    assert reason["../../etc/passwd"] == "bad-id"
    assert reason["unlabelled"] == "no-label"
    assert reason["README"] == reason[".DS_Store"] == "stray-file"

    dups = pd.read_csv(out / "duplicates.csv", dtype=str, keep_default_na=False)
    kinds = {(r.kept, r.dropped): r.kind for r in dups.itertuples()}
    assert kinds[(expected["first"], "copy-exact")] == "exact"
    assert kinds[("", expected["second"])] == kinds[("", "copy-conflict")] == "conflicting-label"
    assert kinds[("leaked", expected["third"])] == "train-test"

    kept = set(zarr.open_group(str(out / "pcam.zarr"), mode="r")["train/id"][:])
    dropped = set(rejects["id"]) | set(dups["dropped"])
    assert not kept & dropped
    assert expected["first"] in kept
    m = summary.manifest
    assert m["rejects"]["count"] == len(rejects)
    assert m["duplicates"]["by_kind"] == {"conflicting-label": 2, "exact": 1, "train-test": 1}
    assert m["duplicates"]["leaked_test_images"] == 1
    assert m["ids"]["sha1_mismatch"] == 1  # copy-exact was dropped; leaked.tif is in test under another name


def outputs_digest(out: Path) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in manifest(out)["files"]}


@pytest.mark.parametrize("scheduler,workers", [("sync", 1), ("threads", 2), ("processes", 2), ("local", 2)])
def test_same_bytes_whatever_the_scheduler(kaggle_src: Path, built: Path, tmp_path: Path, scheduler, workers) -> None:
    out = tmp_path / "again"
    build(BuildConfig(src=kaggle_src, out=out, shard_size=16, chunk_rows=8, folds=3, seed=1,
                      scheduler=scheduler, workers=workers, batch_size=32))
    assert outputs_digest(out) == outputs_digest(built)


def test_groups_never_span_folds(kaggle_src: Path, tmp_path: Path) -> None:
    ids = pd.read_csv(kaggle_src / "train_labels.csv")["id"]
    groups = pd.DataFrame({"id": ids, "group": [f"slide{i % 17}" for i in range(len(ids))]})
    groups.to_csv(tmp_path / "groups.csv", index=False)
    out = tmp_path / "out"
    m = build(BuildConfig(src=kaggle_src, out=out, formats=("hdf5",), folds=4, groups=tmp_path / "groups.csv",
                          workers=1)).manifest
    assert m["folds"]["grouped"]
    with h5py.File(out / "pcam.h5") as h5:
        frame = pd.DataFrame({"id": [i.decode() for i in h5["train/id"][:]], "fold": h5["train/fold"][:]})
    frame = frame.merge(groups, on="id")
    assert (frame.groupby("group")["fold"].nunique() == 1).all()
    assert set(frame["fold"]) == {0, 1, 2, 3}


def test_rebuild_removes_stale_shards(kaggle_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(BuildConfig(src=kaggle_src, out=out, formats=("wds",), shard_size=10, workers=1))
    build(BuildConfig(src=kaggle_src, out=out, formats=("wds",), shard_size=1000, workers=1))
    listed = {f["path"] for f in manifest(out)["files"] if f["format"] == "wds"}
    assert {f"wds/{p.name}" for p in (out / "wds").glob("*.tar")} == listed


@pytest.mark.parametrize("near", [False, True])
def test_copies_inside_test_are_kept_and_reported_once(tmp_path: Path, near: bool) -> None:
    from click.testing import CliRunner

    from pcam_prep.cli import main
    from pcam_prep.synth import write_kaggle

    write_kaggle(tmp_path / "src", 20, 6, seed=4)
    test = tmp_path / "src" / "test"
    original = sorted(test.glob("*.tif"))[0]
    for n, codec in enumerate(("zlib", "lzw")):  # re-saved copies: other TIFF bytes, the same pixels
        tifffile.imwrite(test / f"{'c' * 39}{n}.tif", tifffile.imread(original), photometric="rgb", compression=codec)
    args = ["build", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--formats", "wds", "--folds", "2"]
    result = CliRunner().invoke(main, args + (["--near-duplicates"] if near else []))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "out" / "duplicates.csv")))
    first, *others = sorted([original.stem, *(f"{'c' * 39}{n}" for n in range(2))])  # the smallest id is kept
    assert sorted((r["kept"], r["dropped"], r["kind"]) for r in rows) == [(first, o, "test-duplicate") for o in others]
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["splits"]["test"]["count"] == 8  # every id stays: the submission needs them
    assert m["duplicates"]["count"] == 0 and m["duplicates"]["kept_copies"] == 2
    assert "kept copies 2" in result.output
