"""A new user's wrong turns: each ends in one clear line or the behaviour a user expects (issue: first hour)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcam_prep.cli import main
from pcam_prep.loader import open_source
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.synth import write_kaggle
from pcam_prep.train.config import TrainConfig
from pcam_prep.train.loop import train

TINY = {"device": "cpu", "width": 4, "batch_size": 16}


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("first-hour")
    write_kaggle(root, 60, 12, seed=21)
    return root


@pytest.mark.parametrize("case", ["test-folder", "sample-submission", "tif-ids", "other-size"])
def test_a_build_that_keeps_no_train_image_fails_with_the_likely_cause(src: Path, tmp_path: Path, case: str) -> None:
    args = ["--src", src, "--out", tmp_path / "out"]
    if case == "test-folder":
        args[1], hint = src / "test", f"did you mean --src {src}"
    elif case == "sample-submission":
        args += ["--labels", src / "sample_submission.csv"]
        hint = "is --labels the train labels CSV"
    elif case == "tif-ids":
        rows = (src / "train_labels.csv").read_text().splitlines()
        (tmp_path / "labels.csv").write_text("\n".join([rows[0]] + [r.replace(",", ".tif,") for r in rows[1:]]))
        args += ["--labels", tmp_path / "labels.csv"]
        hint = "ids end in .tif"
    else:
        write_kaggle(tmp_path / "small", 10, 0, size=64, seed=1)
        args[1], hint = tmp_path / "small", "the images are 64x64, not 96x96: pass --image-size"
    code, output = run("build", *args)
    assert code == 1 and "no train image kept (" in output and hint in output, output
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_image_size_builds_other_sizes_and_allow_empty_writes_no_nan(tmp_path: Path) -> None:
    write_kaggle(tmp_path / "small", 10, 0, size=64, seed=1)
    code, output = run("build", "--src", tmp_path / "small", "--out", tmp_path / "o64", "--image-size", "64",
                       "--formats", "wds", "--folds", "2")
    assert code == 0, output
    assert json.loads((tmp_path / "o64" / "manifest.json").read_text())["image_shape"] == [64, 64, 3]
    code, output = run("build", "--src", tmp_path / "small", "--out", tmp_path / "empty", "--allow-empty",
                       "--formats", "wds")
    assert code == 0, output
    text = (tmp_path / "empty" / "manifest.json").read_text()
    assert "NaN" not in text and json.loads(text)["stats"]["mean"] is None


def test_too_many_folds_is_refused_and_one_fold_is_explained_at_train(src: Path, tmp_path: Path) -> None:
    code, output = run("build", "--src", src, "--out", tmp_path / "o", "--folds", "80", "--formats", "wds")
    assert code == 1 and "--folds 80: fold(s)" in output and "would be empty" in output, output
    run("build", "--src", src, "--out", tmp_path / "one", "--folds", "1", "--formats", "wds")
    code, output = run("train", "--shards", tmp_path / "one", "--out", tmp_path / "run", "--device", "cpu")
    assert code == 1 and "built with --folds 1" in output and "at least 2" in output, output


@pytest.fixture(scope="module")
def trained(src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """A build whose test/ holds a zero-byte tif, and a one-epoch run on it; the run's progress events."""
    root = tmp_path_factory.mktemp("with-empty")
    write_kaggle(root, 60, 12, seed=21)
    empty = sorted((root / "test").glob("*.tif"))[0]
    empty.write_bytes(b"")
    out = root / "out"
    build(BuildConfig(src=root, out=out, folds=2, workers=1))
    events: list = []
    train(TrainConfig(shards=out, out=root / "run", epochs=1, log_every=2, resident=False, **TINY),
          progress=events.append)
    return out, root / "run", events


def test_the_training_bar_has_the_epoch_total_and_moves_every_step(trained) -> None:
    out, _, events = trained
    train_rows = len(open_source(out, "train", [1]))
    assert events[0].step == 0 and events[0].images == 0 and events[0].total == train_rows  # shown at once
    steps = [e for e in events if e.record is None][1:]
    assert [e.step for e in steps] == list(range(1, len(steps) + 1))  # every step, not every --log-every
    assert steps[-1].images == train_rows and all(e.total == train_rows for e in steps)
    assert [e.loss is not None for e in steps][:2] == [False, True]  # the loss is read back every 2nd step


def test_predict_writes_a_row_for_every_test_id_and_lists_the_rejected_ones(trained, tmp_path: Path) -> None:
    out, run_dir, _ = trained
    code, output = run("predict", "--shards", out, "--checkpoint", run_dir / "best.pt", "--out", tmp_path / "s.csv",
                       "--device", "cpu")
    assert code == 0, output
    with open(tmp_path / "s.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    missing = list(csv.DictReader(open(tmp_path / "s.missing.csv")))
    assert [m["reason"] for m in missing] == ["empty"] and missing[0]["id"] in {r["id"] for r in rows}
    manifest = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert float(missing[0]["label"]) == pytest.approx(manifest["positives"] / manifest["count"], abs=1e-6)
    assert "1 of them are ids the build rejected" in output and "s.missing.csv" in output


def test_train_refuses_to_overwrite_a_run_and_a_junk_checkpoint_is_named(trained, tmp_path: Path) -> None:
    out, run_dir, _ = trained
    code, output = run("train", "--shards", out, "--out", run_dir, "--device", "cpu")
    assert code == 1 and "already holds a run" in output and "--resume" in output and "--overwrite" in output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    code, output = run("predict", "--shards", out, "--checkpoint", junk, "--out", tmp_path / "s.csv")
    assert code == 1 and "is not a pcam-prep checkpoint (torch.load refused it" in output
    assert len(output.strip().splitlines()) == 1


def test_messages_point_the_right_way(src: Path, tmp_path: Path) -> None:
    run("build", "--src", src, "--out", tmp_path / "z", "--formats", "zarr", "--folds", "2")
    code, output = run("train", "--shards", tmp_path / "z", "--out", tmp_path / "r", "--device", "cpu")
    assert code == 1 and "has no wds output (built: zarr): pass --format zarr" in output
    nest = tmp_path / "nest" / "histopathologic-cancer-detection"
    nest.parent.mkdir()
    os.symlink(src, nest)  # the unzipped folder, one level down
    code, output = run("build", "--src", tmp_path / "nest", "--out", tmp_path / "o")
    assert code == 1 and f"one level down: --src {nest}" in output
    (tmp_path / "afile").write_text("")
    code, output = run("build", "--src", src, "--out", tmp_path / "afile" / "sub")
    assert code == 1 and "afile" in output and len(output.strip().splitlines()) == 1


def test_a_rebuild_says_what_it_reused_and_mismatched_ids_are_shown(src: Path, tmp_path: Path) -> None:
    first = sorted((src / "train").glob("*.tif"))[0]
    copy = tmp_path / "src"
    os.system(f"cp -r {src} {copy}")
    renamed = copy / "train" / ("f" * 40 + ".tif")
    (copy / "train" / first.name).rename(renamed)
    labels = (copy / "train_labels.csv").read_text().replace(first.stem, "f" * 40)
    (copy / "train_labels.csv").write_text(labels)
    args = ["build", "--src", copy, "--out", tmp_path / "o", "--formats", "wds", "--folds", "2"]
    code, output = run(*args)
    assert code == 0 and "1 ids are not the sha1 of their pixels" in output, output
    code, output = run(*args)
    assert "reused 3 of 3 shards" in output, output
    code, output = run("stats", tmp_path / "o")
    assert "sha1 ids           1" in output


def test_options_are_where_users_look(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, output = run("build", "--src", src, "--out", tmp_path / "v", "--formats", "wds", "-v")
    assert code == 0, output  # -v after the sub-command
    spec = tmp_path / "specs" / "run.toml"
    spec.parent.mkdir()
    spec.write_text('[build]\nsrc = "../data"\nout = "../built"\nformats = ["wds"]\nfolds = 2\n')
    os.symlink(src, tmp_path / "data")
    monkeypatch.chdir(tmp_path / "specs")  # not where the paths are relative to
    code, output = run("build", "--config", spec)
    assert code == 0, output
    assert (tmp_path / "built" / "manifest.json").is_file()
    help_text = run("build", "--help")[1]
    assert " ".join(help_text.split()).count("[required, here or in --config]") == 2 and "--image-size" in help_text


def test_a_jpeg_is_named_and_reported_once(src: Path, tmp_path: Path) -> None:
    os.system(f"cp -r {src} {tmp_path / 'src'}")
    train_dir = tmp_path / "src" / "train"
    victim = sorted(train_dir.glob("*.tif"))[0]
    victim.rename(victim.with_suffix(".jpg"))  # a .jpg with a label row
    second = sorted(train_dir.glob("*.tif"))[0]
    second.write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))  # JPEG bytes in a .tif
    code, output = run("build", "--src", tmp_path / "src", "--out", tmp_path / "o", "--formats", "wds", "--folds", "2")
    assert code == 0, output
    rejects = list(csv.DictReader(open(tmp_path / "o" / "rejects.csv")))
    assert [r["reason"] for r in rejects if r["id"] == victim.stem] == ["stray-file"]
    assert [r["detail"] for r in rejects if r["id"] == second.stem][0].startswith("a JPEG file")
    assert {r["split"] for r in rejects} == {"train"}


def test_ctrl_c_during_a_build_is_one_line(tmp_path: Path) -> None:
    write_kaggle(tmp_path / "src", 3000, 0, seed=3)
    proc = subprocess.Popen([sys.executable, "-m", "pcam_prep", "build", "--src", str(tmp_path / "src"), "--out",
                             str(tmp_path / "o"), "--workers", "2", "--near-duplicates"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "o" / ".pcam-prep.lock").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)  # workers started
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, err = proc.communicate(60)
    if proc.returncode == 0:
        pytest.skip("the build finished before the interrupt arrived")
    # 130 from our exit, or -SIGINT when CPython ends by re-raising SIGINT on itself: a shell shows 130 for both
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted: nothing is lost; rerun the same command" in err
    assert len(err.strip().splitlines()) == 1, err
