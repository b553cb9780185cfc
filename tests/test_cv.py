"""`pcam-prep cv`: folds, out-of-fold predictions, the bootstrap CI, suspect labels, the fold ensemble.

Two short CPU cv runs are shared by the slow tests (module fixtures): a Kaggle-layout set of 450
48x48 patches with 30 train labels flipped (3 folds, stratified only), and a PCam-layout set whose
folds are grouped by slide and whose labelled test split checks the OOF estimate. Both train a
width-8 SmallCNN for 2 epochs per fold.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pcam_prep import PcamPrepError
from pcam_prep.cli import main
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.synth import write_kaggle, write_pcam_h5
from pcam_prep.train.config import TrainConfig
from pcam_prep.train.cv import CvConfig, bootstrap_auc_ci, collect, cross_validate, read_oof
from pcam_prep.train.metrics import roc_auc
from pcam_prep.train.review import class_thresholds, find_suspects

FAST = {"device": "cpu", "width": 8, "batch_size": 32, "epochs": 2}
SIZE = 48  # patches of 48x48 (centre window 16x16): a quarter of the pixels, the same label rule


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("noisy")
    summary = write_kaggle(root / "src", 450, 20, seed=7, label_noise=1 / 15, size=SIZE)
    build(BuildConfig(src=root / "src", out=root / "out", folds=3, formats=("wds",), workers=2, image_size=SIZE))
    result = cross_validate(CvConfig(TrainConfig(shards=root / "out", out=root / "run", **FAST)))
    return {"root": root, "out": root / "out", "run": root / "run", "summary": summary, "cv": result}


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("grouped")
    write_pcam_h5(root / "src", 450, 0, 1500, seed=8, size=SIZE)  # a large held-out split: its AUC varies little
    build(BuildConfig(src=root / "src", out=root / "out", folds=3, formats=("wds",), workers=2, image_size=SIZE))
    result = cross_validate(CvConfig(TrainConfig(shards=root / "out", out=root / "run", **FAST)))
    return {"out": root / "out", "run": root / "run", "cv": result}


def test_confident_learning_on_a_hand_computed_example() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    probs = np.array([0.0, 0.1, 0.2, 0.8, 0.9, 0.4, 0.1])
    # t0 = mean P(0) over label 0 = (1 + .9 + .8 + .2) / 4 = .725; t1 = mean P(1) over label 1 = (.9 + .4 + .1) / 3
    t0, t1 = class_thresholds(labels, probs)
    assert t0 == pytest.approx(0.725) and t1 == pytest.approx(1.4 / 3)
    found = find_suspects(labels, probs)
    # row 3: labelled 0, P(1) .8 clears t1 by .8 - .4667; row 6: labelled 1, P(0) .9 clears t0 by .175;
    # row 5 (labelled 1, P(1) .4) is below 0.5 but its P(0) .6 does not clear t0 = .725: not a suspect
    assert found.rows.tolist() == [3, 6]
    assert found.margin == pytest.approx([0.8 - 1.4 / 3, 0.175])


def test_bootstrap_ci_equals_resampling_by_hand_and_is_seeded() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(300) < 0.4
    probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1).round(2)  # many ties
    draws, pos, neg = np.random.default_rng(5), np.flatnonzero(labels), np.flatnonzero(~labels)
    by_hand = []
    for _ in range(1000):
        rows = np.r_[pos[draws.integers(0, len(pos), len(pos))], neg[draws.integers(0, len(neg), len(neg))]]
        by_hand.append(roc_auc(labels[rows], probs[rows]))
    low, high = bootstrap_auc_ci(labels, probs, 1000, seed=5)
    assert (low, high) == pytest.approx(tuple(np.quantile(by_hand, [0.025, 0.975])))
    assert low < roc_auc(labels, probs) < high
    assert bootstrap_auc_ci(labels, probs, 1000, seed=5) == (low, high)


@pytest.mark.slow
def test_cv_writes_oof_for_every_train_image_scored_by_the_model_that_did_not_see_it(noisy: dict) -> None:
    run, summary = noisy["run"], noisy["cv"]
    oof = read_oof(run / "oof.csv")
    manifest = json.loads((noisy["out"] / "manifest.json").read_text())
    assert len(oof["id"]) == len(set(oof["id"])) == manifest["splits"]["train"]["count"]
    for fold in range(3):
        seen = {r["id"] for r in _rows(run / f"fold-{fold}" / "val_predictions.csv")}
        assert set(oof["id"][oof["fold"] == fold]) == seen  # the fold's own validation rows
        ckpt = torch.load(run / f"fold-{fold}" / "best.pt", weights_only=True)
        assert ckpt["config"]["val_fold"] == fold and len(ckpt["manifest_sha256"]) == 64
    assert summary["pooled_oof_auc"] == pytest.approx(roc_auc(oof["label"], oof["prob"]))
    assert summary["ci95"]["low"] <= summary["pooled_oof_auc"] <= summary["ci95"]["high"]
    assert summary["ci95"]["resamples"] >= 1000
    assert not summary["grouped"] and "not grouped" in summary["warning"]
    assert all(f["images_per_s"] > 0 and 0 <= f["data_wait_frac"] < 1 for f in summary["folds"])
    assert json.loads((run / "cv.json").read_text())["pooled_oof_auc"] == summary["pooled_oof_auc"]


@pytest.mark.slow
def test_suspect_list_finds_the_flipped_labels(noisy: dict) -> None:
    truth = {r["id"] for r in _rows(noisy["root"] / "src" / "label_noise.csv")}
    assert len(truth) == noisy["summary"].flipped == 30
    review = _rows(noisy["run"] / "label_review.csv")
    top = {r["id"] for r in review[: len(truth)]}
    print(f"\n{len(top & truth)} of the {len(truth)} flipped labels in the top {len(truth)} of {len(review)} suspects; "
          f"pooled OOF AUC {noisy['cv']['pooled_oof_auc']:.4f}")
    assert len(top & truth) >= len(truth) / 2


@pytest.mark.slow
def test_exclude_rebuilds_without_the_confirmed_ids(noisy: dict, tmp_path: Path) -> None:
    confirmed = tmp_path / "confirmed.csv"
    shutil.copyfile(noisy["root"] / "src" / "label_noise.csv", confirmed)
    out = tmp_path / "out"
    build(BuildConfig(src=noisy["root"] / "src", out=out, folds=3, formats=("wds",), workers=2, image_size=SIZE,
                      exclude=confirmed))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 450 - 30
    assert manifest["excluded"]["count"] == manifest["excluded"]["listed"] == 30


@pytest.mark.slow
def test_fold_models_on_a_held_out_split_score_within_the_oof_ci_and_the_ensemble_averages_them(
        grouped: dict, tmp_path: Path) -> None:
    """OOF estimates one fold model: the mean held-out AUC of the fold models lies in its CI."""
    summary, ci = grouped["cv"], grouped["cv"]["ci95"]
    assert summary["grouped"] and summary["group_by"] == "wsi" and summary["warning"] is None
    ckpts = [grouped["run"] / f"fold-{k}" / "best.pt" for k in range(3)]
    args = ["predict", "--shards", str(grouped["out"]), "--device", "cpu", "--split", "test"]
    aucs = {}
    for name, extra in (("run", ["--run", str(grouped["run"])]),
                        *((f"f{k}", ["--checkpoint", str(c)]) for k, c in enumerate(ckpts))):
        result = CliRunner().invoke(main, [*args, *extra, "--out", str(tmp_path / f"{name}.csv")])
        assert result.exit_code == 0, result.output
        rows = _rows(tmp_path / f"{name}.csv")
        aucs[name] = roc_auc(np.array([int(r["label"]) for r in rows]), np.array([float(r["prob"]) for r in rows]))
    probs = {n: np.array([float(r["prob"]) for r in _rows(tmp_path / f"{n}.csv")]) for n in aucs}
    assert np.allclose(probs["run"], (probs["f0"] + probs["f1"] + probs["f2"]) / 3, atol=2e-6)
    mean = float(np.mean([aucs[f"f{k}"] for k in range(3)]))
    folds = ", ".join(f"{aucs[name]:.4f}" for name in ("f0", "f1", "f2"))
    print(f"\npooled OOF AUC {summary['pooled_oof_auc']:.4f} (CI {ci['low']:.4f}-{ci['high']:.4f}); held-out test: "
          f"fold models {folds}, mean {mean:.4f}, ensemble {aucs['run']:.4f}")
    assert ci["low"] <= mean <= ci["high"]


@pytest.mark.slow
def test_collect_refuses_a_missing_fold_and_folds_from_different_builds(noisy: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(noisy["run"], run)
    assert collect(run)["pooled_oof_auc"] == noisy["cv"]["pooled_oof_auc"]  # the same folds, the same result
    (run / "fold-1" / "fold.json").rename(run / "fold-1" / "fold.json.bak")
    with pytest.raises(PcamPrepError, match=r"fold\(s\) 1 of 3 not finished"):
        collect(run)
    result = CliRunner().invoke(main, ["predict", "--shards", str(noisy["out"]), "--run", str(run)])
    assert result.exit_code == 1 and "fold(s) 1 of 3 not finished" in result.output
    (run / "fold-1" / "fold.json.bak").rename(run / "fold-1" / "fold.json")
    ckpt = torch.load(run / "fold-2" / "best.pt", weights_only=True)
    torch.save({**ckpt, "manifest_sha256": "0" * 64}, run / "fold-2" / "best.pt")
    with pytest.raises(PcamPrepError, match=r"different builds .*fold\(s\) 2 on build 000000000000"):
        collect(run)


@pytest.mark.parametrize(("args", "message"), [
    (["--folds", "7"], "--folds 7: {out} has folds 0..2"),
    (["--folds", "1,x"], "expected 'all' or fold numbers"),
    (["--collect", "{out}"], "{out} is not a cv run"),
])
def test_cv_bad_input_is_one_line_naming_the_problem(built: Path, args: list[str], message: str) -> None:
    out = str(built)
    result = CliRunner().invoke(main, ["cv", "--shards", out, "--device", "cpu", *[a.format(out=out) for a in args]])
    assert result.exit_code != 0
    assert message.format(out=out) in result.output


def test_cv_needs_at_least_two_folds(kaggle_src: Path, tmp_path: Path) -> None:
    build(BuildConfig(src=kaggle_src, out=tmp_path / "one", folds=1, formats=("wds",), workers=1))
    with pytest.raises(PcamPrepError, match="has 1 fold: cross-validation needs at least 2"):
        cross_validate(CvConfig(TrainConfig(shards=tmp_path / "one", out=tmp_path / "run", **FAST)))
    result = CliRunner().invoke(main, ["predict", "--shards", str(tmp_path / "one"), "--run", str(tmp_path)])
    assert result.exit_code == 1 and "is not a cv run" in result.output


@pytest.mark.slow
def test_cv_cli_trains_only_the_folds_asked_for_then_collects(kaggle_src: Path, tmp_path: Path) -> None:
    """A job array: `cv --folds 0` then `cv --folds 1`; the second finds every fold done and collects."""
    out, run = tmp_path / "out", tmp_path / "run"
    build(BuildConfig(src=kaggle_src, out=out, folds=2, formats=("wds",), workers=1))
    common = ["cv", "--shards", str(out), "--out", str(run), "--device", "cpu", "--width", "4", "--epochs", "1",
              "--batch-size", "16"]
    first = CliRunner().invoke(main, [*common, "--folds", "0"])
    assert first.exit_code == 0, first.output
    assert "cv --collect" in first.output and not (run / "cv.json").exists()
    second = CliRunner().invoke(main, [*common, "--folds", "1"])
    assert second.exit_code == 0, second.output
    assert "pooled OOF AUC" in second.output and "WARNING" in second.output and (run / "cv.json").is_file()


@pytest.mark.slow
def test_report_and_submission_of_a_cv_run(noisy: dict, tmp_path: Path) -> None:
    out, run, report = str(noisy["out"]), str(noisy["run"]), tmp_path / "report"
    result = CliRunner().invoke(main, ["predict", "--shards", out, "--run", run, "--device", "cpu", "--tta", "2",
                                       "--out", str(tmp_path / "submission.csv")])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "submission.csv")
    assert list(rows[0]) == ["id", "label"] and len(rows) == 20
    each = [a for k in range(3) for a in ("--checkpoint", f"{run}/fold-{k}/best.pt")]
    result = CliRunner().invoke(main, ["predict", "--shards", out, *each, "--device", "cpu", "--tta", "2",
                                       "--out", str(tmp_path / "each.csv")])
    assert result.exit_code == 0, result.output
    assert _rows(tmp_path / "each.csv") == rows  # repeated --checkpoint is the same ensemble as --run
    result = CliRunner().invoke(main, ["stats", out, "--report", str(report), "--run", run, "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert {"cv_roc.png", "cv_suspects.png"} <= {p.name for p in report.glob("*.png")}
    page = (report / "index.html").read_text()
    assert "pooled OOF AUC" in page and "not grouped" in page and "cv_suspects.png" in page
