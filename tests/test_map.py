"""`pcam-prep map`: Kaggle ids -> PCam split, row and slide, from synthetic pairs that share patches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from pcam_prep.cli import main
from pcam_prep.pipeline.slidemap import TABLE_COLUMNS, match_slides
from pcam_prep.sources.pcam_h5 import pcam_file
from pcam_prep.synth import write_kaggle, write_pair, write_pcam_h5


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def oracle(pcam: Path) -> pd.DataFrame:
    """Every PCam row's sha1 and wsi, read straight from the files: what the map must agree with."""
    frames = []
    for split in ("train", "valid", "test"):
        with h5py.File(pcam / pcam_file(split, "x")) as fh:
            digests = [hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() for image in fh["x"][:]]
        wsi = pd.read_csv(pcam / pcam_file(split, "meta", "csv"))["wsi"]
        frames.append(pd.DataFrame({"digest": digests, "pcam_split": split, "pcam_index": range(len(wsi)),
                                    "wsi": wsi}))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    return write_pair(tmp_path_factory.mktemp("pair"), 60, 20, 20, seed=4)


KAGGLE = pd.DataFrame({"id": ["a", "b", "c", "t", "u"], "kaggle_split": ["train"] * 3 + ["test"] * 2})
PCAM = pd.DataFrame({  # deliberately not in PCam order: the first row is by split, then row
    "digest": ["a", "b", "x", "b", "t", "a"],
    "pcam_split": ["valid", "train", "train", "train", "test", "train"],
    "pcam_index": [3, 1, 2, 5, 0, 0],
    "wsi": ["s9", "s2", "s3", "s2", "s7", "s1"],
})


def test_match_takes_the_first_pcam_row_and_counts_every_kind_of_miss() -> None:
    found = match_slides(KAGGLE, PCAM)
    assert found.groups.to_dict("list") == {"id": ["a", "b"], "group": ["s1", "s2"]}
    table = found.table
    assert list(table.columns) == TABLE_COLUMNS
    assert set(table["kaggle_split"]) == {"train"}  # test ids (and any label) stay out of the table
    assert table[table["id"] == "a"][["pcam_split", "pcam_index", "wsi"]].values.tolist() == [
        ["train", 0, "s1"], ["valid", 3, "s9"]]
    assert table[table["id"] == "c"]["pcam_split"].isna().all() and (table["id"] == "c").sum() == 1
    s = found.summary
    assert s["kaggle"] == {"train": {"train": 2, "unmatched": 1}, "test": {"test": 1, "unmatched": 1}}
    assert s["kaggle_ids_in_several_pcam_rows"] == 2  # a (train + valid), b (twice in train)
    assert s["kaggle_ids_whose_pcam_rows_name_several_wsi"] == 1  # a: s1 and s9
    assert s["pcam_rows"] == {"train": 4, "valid": 1, "test": 1}
    assert s["pcam_rows_repeating_an_earlier_row"] == {"train": 1, "valid": 1, "test": 0}
    assert s["pcam_rows_in_no_kaggle_split"] == {"train": 1, "valid": 0, "test": 0}
    assert found.matched == 3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.sampled_from(["train", "valid", "test"]), st.integers(0, 3)),
                min_size=1, max_size=30),
       st.lists(st.tuples(st.integers(0, 15), st.sampled_from(["train", "test"])), max_size=20, unique_by=lambda t: t))
def test_match_invariants(rows, ids) -> None:
    pcam = pd.DataFrame({"digest": [f"p{d}" for d, _, _ in rows], "pcam_split": [s for _, s, _ in rows],
                         "pcam_index": range(len(rows)), "wsi": [f"w{w}" for *_, w in rows]})
    kaggle = pd.DataFrame({"id": [f"p{d}" for d, _ in ids], "kaggle_split": [s for _, s in ids]}, dtype=object)
    found = match_slides(kaggle, pcam)
    s = found.summary
    assert sum(sum(c.values()) for c in s["kaggle"].values()) == len(kaggle)  # every id counted once
    assert sum(s["pcam_rows_repeating_an_earlier_row"].values()) == len(pcam) - pcam["digest"].nunique()
    train = set(kaggle.loc[kaggle["kaggle_split"] == "train", "id"])
    assert set(found.table["id"]) == train and set(found.groups["id"]) <= train
    assert set(found.groups["id"]) == train & set(pcam["digest"])


def test_map_end_to_end_synth_map_build_grouped_folds(tmp_path: Path) -> None:
    src = tmp_path / "pair"
    result = run("synth", str(src), "--layout", "kaggle-pcam", "--train", "150", "--valid", "40", "--test", "40",
                 "--seed", "2")
    assert result.exit_code == 0, result.output
    result = run("map", "--kaggle", str(src / "kaggle"), "--pcam", str(src / "pcam"), "--out", str(tmp_path / "map"),
                 "--workers", "2", "--batch-size", "64")
    assert result.exit_code == 0, result.output
    assert "matched no PCam row" in result.output and "sha1 of its pixels" in result.output
    truth = write_pair(tmp_path / "again", 150, 40, 40, seed=2)  # the same arguments: the counts to expect
    for name in ("kaggle/train_labels.csv", "kaggle/sample_submission.csv", f"pcam/{pcam_file('train', 'x')}"):
        assert (tmp_path / "again" / name).read_bytes() == (src / name).read_bytes()  # and the same bytes
    summary = json.loads((tmp_path / "map" / "summary.json").read_text())
    assert {k: c["unmatched"] for k, c in summary["kaggle"].items()} == truth.unmatched
    assert {k: sum(c.values()) for k, c in summary["kaggle"].items()} == truth.kaggle
    assert sum(summary["pcam_rows_repeating_an_earlier_row"].values()) == truth.pcam.duplicates
    assert sum(summary["pcam_rows_in_no_kaggle_split"].values()) == truth.dropped_rows
    # every group is the wsi of the first PCam row with the same pixels, hashed independently here
    wsi = oracle(src / "pcam").drop_duplicates("digest").set_index("digest")["wsi"]
    groups = pd.read_csv(tmp_path / "map" / "groups.csv")
    labels = pd.read_csv(src / "kaggle" / "train_labels.csv")
    assert len(groups) == len(labels) - truth.unmatched["train"]
    assert (groups["group"] == groups["id"].map(wsi)).all()
    table = pd.read_csv(tmp_path / "map" / "kaggle_to_pcam.csv")
    assert list(table.columns) == TABLE_COLUMNS and set(table["kaggle_split"]) == {"train"}
    assert set(table["id"]) == set(labels["id"])
    # build the Kaggle side with these groups: no slide spans two folds
    out = tmp_path / "built"
    result = run("build", "--src", str(src / "kaggle"), "--out", str(out), "--formats", "hdf5", "--folds", "3",
                 "--groups", str(tmp_path / "map" / "groups.csv"), "--workers", "1")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["folds"]["grouped"] and manifest["folds"]["group_by"] == "csv"
    with h5py.File(out / "pcam.h5") as fh:
        folds = pd.DataFrame({"id": [i.decode() for i in fh["train/id"][:]], "fold": fh["train/fold"][:]})
    folds = folds.merge(groups, on="id")
    assert len(folds) == len(groups) and folds["group"].nunique() > 3
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    # the built Kaggle OUT maps to the same slides as its source folder
    result = run("map", "--kaggle", str(out), "--pcam", str(src / "pcam"), "--out", str(tmp_path / "map2"),
                 "--workers", "1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "map2" / "groups.csv").read_bytes() == (tmp_path / "map" / "groups.csv").read_bytes()
    assert "the ids the build" in result.output


def test_map_refuses_to_overwrite_and_overwrite_replaces(pair, tmp_path: Path) -> None:
    args = ["map", "--kaggle", str(pair.out / "kaggle"), "--pcam", str(pair.out / "pcam"), "--out", str(tmp_path),
            "--workers", "1"]
    assert run(*args).exit_code == 0
    first = (tmp_path / "groups.csv").read_bytes()
    result = run(*args)
    assert result.exit_code == 2 and "already holds a map" in result.output and "--overwrite" in result.output
    assert run(*args, "--overwrite").exit_code == 0
    assert (tmp_path / "groups.csv").read_bytes() == first


@pytest.mark.parametrize("case, message", [
    ("neither", "is neither a Kaggle folder"),
    ("pcam-is-kaggle", "is not a PCam source folder"),
    ("kaggle-is-pcam", "swapped with --pcam"),
    ("built-pcam", "a build records no PCam row numbers or wsi"),
    ("no-meta", "_meta.csv not found"),
])
def test_map_bad_inputs_say_what_is_wrong(pair, tmp_path: Path, case: str, message: str) -> None:
    kaggle, pcam = pair.out / "kaggle", pair.out / "pcam"
    if case == "neither":
        kaggle = tmp_path / "notes"
        kaggle.mkdir()
        (kaggle / "readme.txt").write_text("hello")
    elif case == "pcam-is-kaggle":
        pcam = kaggle
    elif case == "kaggle-is-pcam":
        kaggle = pcam
    elif case == "built-pcam":
        (tmp_path / "fake").mkdir()
        (tmp_path / "fake" / "manifest.json").write_text("{}")
        pcam = tmp_path / "fake"
    elif case == "no-meta":
        pcam = tmp_path / "pcam"
        pcam.mkdir()
        for path in (pair.out / "pcam").iterdir():
            if not path.name.endswith("valid_meta.csv"):
                (pcam / path.name).write_bytes(path.read_bytes())
    result = run("map", "--kaggle", str(kaggle), "--pcam", str(pcam), "--out", str(tmp_path / "map"),
                 "--workers", "1")
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "map").exists() or not any((tmp_path / "map").iterdir())


def test_map_with_no_match_says_so_and_writes_nothing(tmp_path: Path) -> None:
    write_kaggle(tmp_path / "kaggle", 12, 4, seed=1)
    write_pcam_h5(tmp_path / "pcam", 10, 4, 4, seed=1)
    result = run("map", "--kaggle", str(tmp_path / "kaggle"), "--pcam", str(tmp_path / "pcam"),
                 "--out", str(tmp_path / "map"), "--workers", "1")
    assert result.exit_code == 1 and "no Kaggle id" in result.output and "matches a PCam row" in result.output
    assert not (tmp_path / "map" / "groups.csv").exists()


def test_synth_pair_shares_patches_but_not_all(pair) -> None:
    rows = oracle(pair.out / "pcam")
    kaggle = {split: {p.stem for p in (pair.out / "kaggle" / split).glob("*.tif")} for split in ("train", "test")}
    assert {split: len(ids) for split, ids in kaggle.items()} == pair.kaggle
    every = kaggle["train"] | kaggle["test"]
    assert len(every - set(rows["digest"])) == sum(pair.unmatched.values()) > 0
    assert int((~rows["digest"].isin(every)).sum()) == pair.dropped_rows >= pair.dropped > 0
    assert not kaggle["test"] & set(rows.loc[rows["pcam_split"] != "test", "digest"])  # Kaggle test: PCam test only
    assert kaggle["train"] & set(rows.loc[rows["pcam_split"] == "valid", "digest"])  # Kaggle train: PCam valid too
