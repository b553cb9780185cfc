"""Centre-aware QC: each metric on constructed patches, the flags through a real build, --drop-flags."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner

from pcam_prep import qc
from pcam_prep.cli import main
from pcam_prep.errors import PcamPrepError
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.schema import centre_window
from pcam_prep.synth import write_kaggle
from pcam_prep.synth.kaggle import make_patch

from .corpus import sha1_id

C = centre_window(96)


def tissue(seed: int = 0, label: int = 0) -> np.ndarray:
    return make_patch(np.random.default_rng(seed), label)[0]


def box_blur(img: np.ndarray, k: int = 9) -> np.ndarray:
    """A k x k mean filter (edge-padded), per channel: out of focus."""
    pad = np.pad(img.astype(np.float64), ((k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(pad, (k, k), axis=(0, 1))
    return np.round(windows.mean(axis=(-1, -2))).astype(np.uint8)


def constructed() -> dict[str, np.ndarray]:
    """One patch per flag, plus a good one and two blanks."""
    good = tissue(1)
    background_centre = good.copy()
    background_centre[C, C] = 242  # white glass in the centre, tissue around it
    blurred_centre = good.copy()
    blurred_centre[C, C] = box_blur(tissue(2), 15)[C, C]
    dark = (tissue(3) // 6).astype(np.uint8)  # every pixel < 43
    over = (250 - tissue(4) // 40).astype(np.uint8)  # 244..250, still a little colour
    return {"good": good, "centre-background": background_centre, "blurry": blurred_centre, "dark": dark,
            "overexposed": over, "white": np.full((96, 96, 3), 255, np.uint8),
            "black": np.zeros((96, 96, 3), np.uint8)}


def reference(img: np.ndarray) -> dict[str, float]:
    """The metrics written the obvious (slow, float) way."""
    rgb = img.astype(np.float64)
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
    grey = np.floor((rgb[..., 0] * 77 + rgb[..., 1] * 150 + rgb[..., 2] * 29 + 128) / 256)
    lap = np.zeros((96, 96))
    for y in range(1, 95):
        for x in range(1, 95):
            lap[y, x] = grey[y - 1, x] + grey[y + 1, x] + grey[y, x - 1] + grey[y, x + 1] - 4 * grey[y, x]
    return {"tissue": (sat > 0.07).mean(), "tissue_centre": (sat[C, C] > 0.07).mean(),
            "sharpness": lap[1:95, 1:95].var(), "sharpness_centre": lap[C.start + 1 : C.stop - 1, C.start + 1 : C.stop - 1].var(),
            "p05": np.percentile(grey, 5, method="inverted_cdf"), "p95": np.percentile(grey, 95, method="inverted_cdf")}


def test_metrics_match_the_obvious_float_computation() -> None:
    patches = constructed()
    metrics = qc.measure(np.stack(list(patches.values())))
    for row, (name, img) in zip(metrics, patches.items()):
        want = reference(img)
        for i, column in enumerate(qc.COLUMNS):
            assert row[i] == pytest.approx(want[column], rel=1e-9, abs=1e-9), (name, column)


def test_each_constructed_patch_gets_its_flag_and_blanks_give_numbers() -> None:
    patches = constructed()
    metrics = qc.measure(np.stack(list(patches.values())))
    assert np.isfinite(metrics).all()
    names = dict(zip(patches, qc.flag_names(qc.flag_masks(metrics, qc.Thresholds()))))
    assert names["good"] == ""
    for flag in ("centre-background", "blurry", "dark"):
        assert names[flag] == flag, (flag, names[flag])
    assert names["overexposed"] == "centre-background;overexposed"  # washed out: too pale to count as tissue
    assert names["white"] == "centre-background;overexposed"
    assert names["black"] == "centre-background;dark"
    white = metrics[list(patches).index("white")]
    assert white[0] == 0 and white[2] == 0 and white[4] == 255


def test_metrics_do_not_depend_on_the_batch() -> None:
    images = np.stack([tissue(s, s % 2) for s in range(130)])  # more than two blocks, a ragged tail
    together = qc.measure(images)
    alone = np.concatenate([qc.measure(images[i : i + 1]) for i in range(len(images))])
    assert np.array_equal(together, alone)
    assert qc.measure(images[:0]).shape == (0, len(qc.COLUMNS))


def test_unknown_flag_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(PcamPrepError, match="unknown QC flag.*sharp.*valid flags: centre-background, blurry"):
        BuildConfig(src=tmp_path, out=tmp_path, drop_flags=("blurry", "sharp"))
    result = CliRunner().invoke(main, ["build", "--src", str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--drop-flags", "nope"])
    assert result.exit_code == 1
    assert "unknown QC flag(s) nope; valid flags: centre-background, blurry, dark, overexposed" in result.output


def _kaggle_with_flagged(root: Path) -> dict[str, str]:
    """A synthetic competition folder plus the constructed patches in train (label 1) and one in test."""
    write_kaggle(root, 60, 10, seed=5)
    ids = {}
    patches = constructed()
    rows = []
    for name in ("centre-background", "blurry", "dark", "overexposed"):
        img = patches[name]
        ids[name] = sha1_id(img)
        tifffile.imwrite(root / "train" / f"{ids[name]}.tif", img, photometric="rgb")
        rows.append((ids[name], 1))
    test_img = patches["centre-background"].copy()
    test_img[0, 0] = 7  # a different patch with the same flag, in test
    ids["test"] = sha1_id(test_img)
    tifffile.imwrite(root / "test" / f"{ids['test']}.tif", test_img, photometric="rgb")
    with open(root / "train_labels.csv", "a", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    return ids


def test_build_writes_qc_csv_counts_flags_and_drops_only_on_request(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ids = _kaggle_with_flagged(src)
    out = tmp_path / "plain"
    build(BuildConfig(src=src, out=out, folds=2, workers=2, formats=("wds",)))
    table = pd.read_csv(out / "qc.csv", dtype={"id": str, "flags": str}, keep_default_na=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(table) == 75 and list(table["split"].unique()) == ["train", "test"]
    by_id = table.set_index("id")
    assert by_id.loc[ids["overexposed"], "flags"] == "centre-background;overexposed"  # too pale for tissue
    for flag in qc.FLAGS:
        n = 2 if flag == "centre-background" else 1
        assert flag in by_id.loc[ids[flag], "flags"].split(";")
        assert manifest["qc"]["flags"][flag]["kept"]["train"] == {"count": n, "by_label": {"0": 0, "1": n}}
    assert by_id.loc[ids["test"], "flags"] == "centre-background"
    assert by_id.loc[ids["test"], "label"] == ""  # unlabelled, not 0.0
    assert manifest["qc"]["flags"]["centre-background"]["kept"]["test"] == {"count": 1}
    assert manifest["qc"]["dropped"]["count"] == 0
    assert any(f["path"] == "qc.csv" for f in manifest["files"])

    dropped = tmp_path / "dropped"
    result = CliRunner().invoke(main, ["build", "--src", str(src), "--out", str(dropped), "--folds", "2",
                                       "--formats", "wds", "--drop-flags", "centre-background,blurry"])
    assert result.exit_code == 0, result.output
    assert "QC dropped 3" in result.output
    rejects = pd.read_csv(dropped / "rejects.csv", keep_default_na=False).set_index("id")
    assert rejects.loc[ids["centre-background"], "reason"] == "centre-background"
    assert rejects.loc[ids["centre-background"], "detail"].startswith("tissue_centre 0 < 0.1")
    assert rejects.loc[ids["blurry"], "reason"] == "blurry"
    assert rejects.loc[ids["overexposed"], "reason"] == "centre-background"  # the first of its dropped flags
    assert ids["test"] not in rejects.index  # the submission needs every test id
    manifest = json.loads((dropped / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 61 and manifest["splits"]["test"]["count"] == 11
    assert manifest["qc"]["dropped"]["by_flag"] == {"blurry/train": 1, "centre-background/train": 2}

    # Dropping is the same as never having had those files: same moments, same kept train ids.
    for name in ("centre-background", "blurry", "overexposed"):
        (src / "train" / f"{ids[name]}.tif").unlink()
    without = tmp_path / "without"
    build(BuildConfig(src=src, out=without, folds=2, workers=2, formats=("wds",)))
    expected = json.loads((without / "manifest.json").read_text())
    assert manifest["stats"] == expected["stats"]
    assert manifest["folds"]["counts"] == expected["folds"]["counts"]


def test_pcam_source_gets_qc_and_the_report_has_a_qc_page(tmp_path: Path) -> None:
    from pcam_prep.synth import write_pcam_h5

    write_pcam_h5(tmp_path / "pcam", 80, 20, 20, seed=2)
    out = tmp_path / "out"
    build(BuildConfig(src=tmp_path / "pcam", out=out, folds=2, workers=2, formats=("zarr",)))
    table = pd.read_csv(out / "qc.csv")
    assert len(table) == sum(json.loads((out / "manifest.json").read_text())["splits"][s]["count"]
                             for s in ("train", "valid", "test"))
    assert table[list(qc.COLUMNS)].notna().all().all()
    result = CliRunner().invoke(main, ["stats", str(out), "--report", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "QC flags" in result.output
    assert (tmp_path / "report" / "qc_flags.png").stat().st_size > 10_000
    assert "qc_flags.png" in (tmp_path / "report" / "index.html").read_text()
