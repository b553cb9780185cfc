"""The synthetic Kaggle folder: layout, file format, the PCam label rule, determinism, argument checks."""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pcam_prep.schema import centre_window
from pcam_prep.synth import SynthSummary, make_patch, write_kaggle


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary]:
    out = tmp_path_factory.mktemp("synth")
    return out, write_kaggle(out, 40, 10, seed=1)


def test_centre_window_is_the_pcam_window():
    assert centre_window(96) == slice(32, 64)
    for size in (32, 33, 64, 100, 97):
        rows = centre_window(size)
        assert rows.stop - rows.start == size // 3
        assert abs(rows.start - (size - rows.stop)) <= 1  # centred


def test_layout_and_csvs(small):
    out, summary = small
    assert summary == SynthSummary(out=out, n_train=40, n_test=10, positives=round(40 * 0.405))
    assert sorted(p.name for p in out.iterdir()) == ["sample_submission.csv", "test", "train", "train_labels.csv"]
    train, test = sorted(out.glob("train/*")), sorted(out.glob("test/*"))
    assert len(train) == 40 and len(test) == 10 and all(p.suffix == ".tif" for p in train + test)

    labels = _rows(out / "train_labels.csv")
    assert labels[0] == ["id", "label"]
    assert [r[0] for r in labels[1:]] == [p.stem for p in train]  # one row per file, sorted by id
    assert {r[1] for r in labels[1:]} == {"0", "1"}
    assert sum(r[1] == "1" for r in labels[1:]) == summary.positives

    sub = _rows(out / "sample_submission.csv")
    assert sub[0] == ["id", "label"]
    assert [r[0] for r in sub[1:]] == [p.stem for p in test] and {r[1] for r in sub[1:]} == {"0"}
    assert not {p.stem for p in train} & {p.stem for p in test}


def test_files_are_plain_tifffile_output_named_by_pixel_sha1(small, tmp_path: Path):
    out, _ = small
    for path in sorted(out.glob("*/*.tif")):
        img = tifffile.imread(path)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        assert hashlib.sha1(img.tobytes()).hexdigest() == path.stem
        with tifffile.TiffFile(path) as tif:
            assert len(tif.pages) == 1 and tif.byteorder == "<" and not tif.is_bigtiff
            page = tif.pages[0]
            assert page.compression == 1 and len(page.dataoffsets) == 1
        tifffile.imwrite(tmp_path / "ref.tif", img)  # how the real files were written
        assert path.read_bytes() == (tmp_path / "ref.tif").read_bytes()


@pytest.mark.parametrize("size", [96, 32, 100])
def test_label_rule_holds_for_every_draw(size: int):
    rng = np.random.default_rng(7)
    win = (centre_window(size),) * 2
    draws = 300 if size == 96 else 40
    outer_tumour = 0
    for label in (0, 1):
        for _ in range(draws):
            img, mask = make_patch(rng, label, size)
            assert img.shape == (size, size, 3) and img.dtype == np.uint8
            assert mask.shape == (size, size) and mask.dtype == bool
            assert bool(mask[win].any()) == bool(label)
            outer_tumour += label == 0 and bool(mask.any())
    if size == 96:  # ~35% of negatives carry tumour, strictly outside the centre window
        assert 0.2 * draws < outer_tumour < 0.5 * draws


def test_patches_look_like_h_and_e():
    rng = np.random.default_rng(3)
    imgs = np.stack([make_patch(rng, i % 2)[0] for i in range(40)]).astype(float)
    r, g, b = imgs[..., 0].mean(), imgs[..., 1].mean(), imgs[..., 2].mean()
    assert r > b > g  # pink-purple: green is absorbed by both stains
    assert imgs.std(axis=(1, 2)).min() > 10  # every patch has structure, none is flat


def test_same_seed_same_bytes_and_train_independent_of_test(tmp_path: Path):
    write_kaggle(tmp_path / "a", 20, 6, seed=5)
    write_kaggle(tmp_path / "b", 20, 6, seed=5)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    write_kaggle(tmp_path / "c", 20, 0, seed=5)
    assert (tmp_path / "c/train_labels.csv").read_bytes() == (tmp_path / "a/train_labels.csv").read_bytes()
    write_kaggle(tmp_path / "d", 20, 6, seed=6)
    assert not set(_digests(tmp_path / "a").values()) & set(_digests(tmp_path / "d").values())


def test_rewriting_a_folder_overwrites_and_warns_about_strays(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    write_kaggle(tmp_path, 8, 2, seed=1)
    before = _digests(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pcam_prep.synth"):
        write_kaggle(tmp_path, 8, 2, seed=1)
    assert _digests(tmp_path) == before and not caplog.records
    with caplog.at_level(logging.WARNING, logger="pcam_prep.synth"):
        write_kaggle(tmp_path, 8, 2, seed=2)
    assert any("earlier run" in r.getMessage() for r in caplog.records)


def test_progress_reports_every_file(tmp_path: Path):
    calls: list[tuple[str, int, int]] = []
    write_kaggle(tmp_path, 290, 10, seed=0, progress=lambda *call: calls.append(call))
    assert calls == [("synth", 256, 300), ("synth", 300, 300)]


@pytest.mark.parametrize("fraction, positives", [(0.0, 0), (1.0, 12), (0.5, 6)])
def test_positive_fraction(tmp_path: Path, fraction: float, positives: int):
    summary = write_kaggle(tmp_path, 12, 0, positive_fraction=fraction)
    assert summary.positives == positives
    assert sum(r[1] == "1" for r in _rows(tmp_path / "train_labels.csv")[1:]) == positives
    assert _rows(tmp_path / "sample_submission.csv") == [["id", "label"]]


@pytest.mark.parametrize("kwargs, name", [
    ({"n_train": -1}, "n_train"),
    ({"n_test": -3}, "n_test"),
    ({"size": 31}, "size"),
    ({"n_train": 2.5}, "n_train"),
    ({"positive_fraction": -0.1}, "positive_fraction"),
    ({"positive_fraction": 1.5}, "positive_fraction"),
    ({"positive_fraction": math.nan}, "positive_fraction"),
])
def test_bad_arguments_are_rejected_up_front(tmp_path: Path, kwargs: dict, name: str):
    args = {"n_train": 4, "n_test": 1} | kwargs
    n_train, n_test = args.pop("n_train"), args.pop("n_test")
    with pytest.raises(ValueError, match=name):
        write_kaggle(tmp_path / "out", n_train, n_test, **args)
    assert not (tmp_path / "out").exists()


def test_make_patch_rejects_bad_label_and_size():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="label"):
        make_patch(rng, 2)
    with pytest.raises(ValueError, match="size"):
        make_patch(rng, 1, size=16)
