"""`pcam-prep stats` and its report, on a small synthetic competition folder with awkward extras."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from matplotlib.colors import rgb_to_hsv
from matplotlib.figure import Figure
from PIL import Image

from pcam_prep.cli.stats import stats
from pcam_prep.eda.collect import channel_histograms, choose_rows, mean_saturation
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.synth import write_kaggle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# What the awkward extras become: dropped copies and rejected files are not train images.
NOT_KEPT = {"zz-copy", "leak", "empty", "black", "small", "gone"}
PALE = [f"pale-{i}" for i in range(3)]  # low-saturation patches: the background rule must find them


def add_awkward_files(root: Path) -> None:
    """An exact duplicate, a train copy of a test image, pale background patches and bad files."""
    train = root / "train"
    first = min(train.glob("*.tif"))
    labels = dict(line.split(",") for line in (root / "train_labels.csv").read_text().split()[1:])
    shutil.copyfile(first, train / "zz-copy.tif")
    shutil.copyfile(min((root / "test").glob("*.tif")), train / "leak.tif")
    rng = np.random.default_rng(0)
    for name in PALE:
        pale = (235 + rng.integers(-6, 7, (96, 96, 3))).astype(np.uint8)
        tifffile.imwrite(train / f"{name}.tif", pale, photometric="rgb")
    (train / "empty.tif").write_bytes(b"")
    tifffile.imwrite(train / "black.tif", np.zeros((96, 96, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(train / "small.tif", np.full((50, 50, 3), 128, np.uint8), photometric="rgb")
    rows = [("zz-copy", labels[first.stem]), ("leak", "1"), *((p, "0") for p in PALE),
            ("empty", "1"), ("black", "0"), ("small", "1"), ("gone", "1")]
    with open(root / "train_labels.csv", "a") as fh:
        fh.writelines(f"{i},{label}\n" for i, label in rows)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eda-src")
    write_kaggle(root, 60, 15, seed=5)
    add_awkward_files(root)
    return root


@pytest.fixture(scope="module")
def out(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eda-out")
    build(BuildConfig(src=src, out=out, formats=("zarr",), workers=1))
    return out


def run_stats(*args: str) -> tuple[dict | None, str]:
    result = CliRunner().invoke(stats, [*map(str, args)])
    assert result.exit_code == 0, result.output
    return (json.loads(result.stdout) if "--json" in args else None), result.output


def kept_train_images(src: Path) -> tuple[np.ndarray, np.ndarray]:
    """Kept train pixels and labels, read with tifffile, independently of the package."""
    lines = (src / "train_labels.csv").read_text().split()[1:]
    rows = sorted((i, int(y)) for i, y in (line.split(",") for line in lines) if i not in NOT_KEPT)
    images = np.stack([tifffile.imread(src / "train" / f"{i}.tif") for i, _ in rows])
    return images, np.array([y for _, y in rows])


def test_json_stats_equal_a_numpy_reference_and_the_manifest(src: Path, out: Path) -> None:
    found, _ = run_stats(out, "--json", "--workers", "1")
    images, labels = kept_train_images(src)
    pixels = images.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(found["stats"]["mean"], pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(found["stats"]["std"], pixels.std(axis=0), rtol=1e-9)
    manifest = json.loads((out / "manifest.json").read_text())
    assert found["stats"]["mean"] == manifest["stats"]["mean"] and found["stats"]["std"] == manifest["stats"]["std"]
    assert found["splits"]["train"]["count"] == len(images) == 63
    assert found["splits"]["train"]["positives"] == labels.sum()
    assert found["folds"]["counts"] == [{**f, "positive_share": f["positives"] / f["count"]}
                                        for f in manifest["folds"]["counts"]]
    assert found["rejects"]["by_reason"] == {"bad-shape": 1, "blank": 1, "empty": 1, "missing-file": 1}
    assert found["duplicates"]["by_kind"] == {"exact": 1, "train-test": 1}
    saturation = rgb_to_hsv(images / 255.0)[..., 1].mean(axis=(1, 2))  # matplotlib's HSV as the reference
    background = found["background"]["train"]
    assert background["background"] == int((saturation < 0.07).sum()) == len(PALE)
    assert background["by_label"]["0"]["background"] == len(PALE) and background["by_label"]["1"]["background"] == 0
    assert found["background"]["test"] == {"images": 15, "background": 0, "share": 0.0}


def test_raw_folder_and_its_build_agree(src: Path, out: Path) -> None:
    built, _ = run_stats(out, "--json", "--workers", "1")
    raw, _ = run_stats(src, "--json", "--workers", "2")  # processes: the tasks pickle and merge in order
    from_train_dir, _ = run_stats(src / "train", "--json", "--workers", "1")
    assert (built["kind"], raw["kind"], raw["source"]) == ("built", "raw", "tif")
    for key in ("image_shape", "splits", "folds", "stats", "rejects", "duplicates", "background"):
        assert raw[key] == built[key] == from_train_dir[key], key


@pytest.mark.parametrize("fmt", ["wds", "hdf5"])
def test_every_store_gives_the_same_stats(src: Path, out: Path, tmp_path: Path, fmt: str) -> None:
    build(BuildConfig(src=src, out=tmp_path, formats=(fmt,), shard_size=16, workers=1))
    other, _ = run_stats(tmp_path, "--json", "--workers", "1")
    zarr, _ = run_stats(out, "--json", "--workers", "1")
    assert other["source"] == fmt
    assert {k: v for k, v in other.items() if k not in ("target", "source")} == \
           {k: v for k, v in zarr.items() if k not in ("target", "source")}


def test_table_names_what_matters(out: Path) -> None:
    _, text = run_stats(out, "--workers", "1")
    for words in ("image shape  96 x 96 x 3", "fold", "train", "test", "mean", "std", "bad-shape: 1", "exact: 1",
                  "background"):
        assert words in text


def fake_run(folder: Path, with_pngs: bool) -> Path:
    folder.mkdir()
    epochs = [{"epoch": i + 1, "train_loss": 0.7 - 0.1 * i, "val_loss": 0.72 - 0.08 * i, "val_auc": 0.6 + 0.1 * i,
               "val_acc": 0.55 + 0.1 * i} for i in range(3)]
    (folder / "metrics.json").write_text(json.dumps({"epochs": epochs, "best_epoch": 2}))
    if with_pngs:
        for name in ("curves", "roc"):  # no confusion.png and no predictions: that figure is skipped
            fig = Figure(figsize=(2, 2))
            fig.subplots().plot([0, 1], [0, 1])
            fig.savefig(folder / f"{name}.png")
    return folder


@pytest.mark.parametrize("with_pngs", [True, False])
def test_report_writes_readable_pngs_and_links_every_one(out: Path, tmp_path: Path, with_pngs: bool) -> None:
    run = fake_run(tmp_path / "run", with_pngs)
    report = tmp_path / "report"
    report.mkdir()
    (report / "run_confusion.png").write_bytes(PNG_MAGIC)  # stale, from an earlier report
    run_stats(out, "--report", report, "--run", run, "--workers", "1", "--sample-per-label", "4")
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert {"samples.png", "label_balance.png", "intensity_histograms.png", "background_saturation.png",
            "duplicates.png", "rejects.png", "run_curves.png"} <= set(pngs)
    for name in pngs:
        data = (report / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        with Image.open(report / name) as image:
            image.verify()
    page = (report / "index.html").read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs
    assert "<title>" in page and "<figcaption>" in page and "<table>" in page
    assert "Run confusion figure skipped" in page
    if with_pngs:
        assert (report / "run_roc.png").read_bytes() == (run / "roc.png").read_bytes()
    else:
        assert "run_roc.png" not in pngs


def test_report_notes_missing_sources(tmp_path: Path) -> None:
    write_kaggle(tmp_path / "src", 12, 0, seed=1)
    add_awkward_files_without_test(tmp_path / "src")
    build(BuildConfig(src=tmp_path / "src", out=tmp_path / "out", formats=("zarr",), folds=2, workers=1))
    shutil.rmtree(tmp_path / "src")
    run_stats(tmp_path / "out", "--report", tmp_path / "report", "--workers", "1")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "1 rejects not shown: source files not found" in page
    assert not (tmp_path / "report" / "rejects.png").exists()


def add_awkward_files_without_test(root: Path) -> None:
    (root / "train" / "empty.tif").write_bytes(b"")
    with open(root / "train_labels.csv", "a") as fh:
        fh.write("empty,0\n")


@pytest.mark.parametrize("args,message", [
    ([], "neither a built folder"),
    (["--run", "."], "--run RUN only adds figures to a report"),
])
def test_bad_target_or_options_are_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(stats, [str(tmp_path), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_help_has_an_example() -> None:
    result = CliRunner().invoke(stats, ["--help"])
    assert result.exit_code == 0 and "Example:" in result.output


@settings(max_examples=40, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.just(3))))
def test_saturation_matches_matplotlib_hsv(images: np.ndarray) -> None:
    expected = rgb_to_hsv(images / 255.0)[..., 1].reshape(len(images), -1).mean(axis=1)
    np.testing.assert_allclose(mean_saturation(images), expected, rtol=1e-6, atol=1e-7)


@given(arrays(np.uint8, (5, 4, 4, 3)), arrays(np.uint8, 5, elements=st.integers(0, 1)))
def test_histograms_count_every_pixel_once(images: np.ndarray, labels: np.ndarray) -> None:
    hist = channel_histograms(images, labels, 2)
    for label in (0, 1):
        chosen = images[labels == label]
        assert hist[label].sum() == chosen.size
        for c in range(3):
            assert hist[label, c, 7] == (chosen[..., c] == 7).sum()


def test_sample_choice_is_seeded_and_per_label() -> None:
    labels = np.array([0, 1] * 20)
    first, again = choose_rows(labels, 5, seed=3), choose_rows(labels, 5, seed=3)
    assert all(np.array_equal(first[k], again[k]) for k in (0, 1))
    assert all((labels[first[k]] == k).all() and len(first[k]) == 5 for k in (0, 1))
    assert len(choose_rows(labels, 100, seed=0)[1]) == 20


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_stats_covers_every_split_of_a_pcam_build_without_test(tmp_path: Path, fmt: str) -> None:
    from pcam_prep.synth import write_pcam_h5

    write_pcam_h5(tmp_path / "src", 40, 12, 0, seed=2)
    build(BuildConfig(src=tmp_path / "src", out=tmp_path / "out", formats=(fmt,), folds=2, workers=1))
    found, _ = run_stats(tmp_path / "out", "--json", "--workers", "1")
    assert list(found["splits"]) == ["train", "valid"]
    for split in ("train", "valid"):
        part = found["background"][split]
        assert part["images"] == found["splits"][split]["count"] > 0
        assert sum(p["images"] for p in part["by_label"].values()) == part["images"]
    run_stats(tmp_path / "out", "--report", tmp_path / "report", "--workers", "1")
    assert (tmp_path / "report" / "intensity_histograms.png").is_file()


def test_stats_and_report_on_a_kaggle_build_without_test(tmp_path: Path) -> None:
    write_kaggle(tmp_path / "src", 30, 5, seed=4)
    build(BuildConfig(src=tmp_path / "src", out=tmp_path / "out", formats=("zarr",), folds=2, no_test=True, workers=1))
    found, _ = run_stats(tmp_path / "out", "--json", "--workers", "1")
    assert found["splits"]["test"]["count"] == found["background"]["test"]["images"] == 0
    assert found["background"]["train"]["images"] == found["splits"]["train"]["count"] > 0
    run_stats(tmp_path / "out", "--report", tmp_path / "report", "--workers", "1")
    assert (tmp_path / "report" / "background_saturation.png").is_file()
