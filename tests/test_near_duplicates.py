"""Flipped and rotated copies (the 8 dihedral transforms), found with --near-duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from pcam_prep.loader import open_source
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.pipeline.dedup import _views, dihedral_digest
from pcam_prep.synth import write_kaggle

from .corpus import image, sha1_id


def test_all_eight_transforms_share_one_digest_and_other_images_do_not() -> None:
    img = image(3)
    digests = {dihedral_digest(np.ascontiguousarray(v)) for v in _views(img)}
    assert len(digests) == 1
    assert dihedral_digest(image(4)) not in digests
    shifted = img.copy()
    shifted[40, 40, 0] ^= 1  # one bit in the middle: a different patch
    assert dihedral_digest(shifted) not in digests


def test_symmetric_images_whose_first_rows_tie_are_compared_whole() -> None:
    img = image(5)
    img[0] = img[0, ::-1]  # a palindromic first row: the border alone cannot pick the transform
    img[:, 0] = img[::-1, 0]
    img[0] = 128
    img[:, 0] = 128
    img[-1] = 128
    img[:, -1] = 128  # every transform now starts with the same 96 grey pixels
    digests = {dihedral_digest(np.ascontiguousarray(v)) for v in _views(img)}
    assert len(digests) == 1


@pytest.fixture(scope="module")
def rotated_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A synthetic set plus rotated/flipped copies: same label, other label, and of a test image."""
    src = tmp_path_factory.mktemp("near") / "src"
    write_kaggle(src, 60, 10, seed=9)
    labels = pd.read_csv(src / "train_labels.csv")
    originals = labels["id"].tolist()
    added = []

    def copy(of: Path, transform, label: int | None, split: str) -> str:
        pixels = np.ascontiguousarray(transform(tifffile.imread(of)))
        new = sha1_id(pixels)
        tifffile.imwrite(src / split / f"{new}.tif", pixels)
        if label is not None:
            added.append({"id": new, "label": label})
        return new

    train, test = src / "train", src / "test"
    same = copy(train / f"{originals[0]}.tif", lambda x: np.rot90(x, 1), int(labels.label[0]), "train")
    other = copy(train / f"{originals[1]}.tif", lambda x: x[:, ::-1], 1 - int(labels.label[1]), "train")
    test_id = sorted(p.stem for p in test.glob("*.tif"))[0]
    leak = copy(test / f"{test_id}.tif", lambda x: np.rot90(x, 3).transpose(1, 0, 2), 0, "train")
    pd.concat([labels, pd.DataFrame(added)]).to_csv(src / "train_labels.csv", index=False)
    return src, {"same": same, "same_of": originals[0], "other": other, "other_of": originals[1], "leak": leak,
                 "leak_of": test_id}


def test_near_duplicates_are_reported_and_dropped_by_the_exact_policy(rotated_src, tmp_path: Path) -> None:
    src, ids = rotated_src
    build(BuildConfig(src=src, out=tmp_path, formats=("wds",), near_duplicates=True, workers=2, batch_size=16))
    rows = pd.read_csv(tmp_path / "duplicates.csv", keep_default_na=False)
    found = {(r.kind, r.dropped): r.kept for r in rows.itertuples()}
    kept_of_same = min(ids["same"], ids["same_of"])
    assert found[("dihedral", max(ids["same"], ids["same_of"]))] == kept_of_same
    assert found[("dihedral-conflicting-label", ids["other"])] == ""
    assert found[("dihedral-conflicting-label", ids["other_of"])] == ""
    assert found[("dihedral-train-test", ids["leak"])] == ids["leak_of"]
    assert len(rows) == 4
    train_ids = set(open_source(tmp_path, "train").ids)
    assert kept_of_same in train_ids and not {ids["other"], ids["other_of"], ids["leak"]} & train_ids
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["duplicates"]["count"] == 4 and manifest["splits"]["train"]["count"] == 63 - 4
    assert manifest["config"]["near_duplicates"] is True


def test_without_the_flag_rotated_copies_are_kept(rotated_src, tmp_path: Path) -> None:
    src, ids = rotated_src
    build(BuildConfig(src=src, out=tmp_path, formats=("wds",), workers=1))
    assert pd.read_csv(tmp_path / "duplicates.csv").empty
    assert {ids["same"], ids["other"], ids["leak"]} <= set(open_source(tmp_path, "train").ids)
