"""`pcam-prep sweep`: the space file, a real Optuna study of tiny train runs, pruning, Ctrl-C and rerun."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcam_prep import PcamPrepError
from pcam_prep.cli import main
from pcam_prep.train import sweep as sweep_module
from pcam_prep.train.space import SweepConfig, default_space, load_space, parse_space
from pcam_prep.train.sweep import objective, sweep

optuna = pytest.importorskip("optuna")

TINY_SPEC = """
[train]
width = 4
batch_size = 16
device = "cpu"

[space.lr]
low = 1e-3
high = 1e-2
log = true

[space.optimizer]
choices = ["adamw", "sgd"]
"""


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(TINY_SPEC)
    return path


def test_the_default_space_and_the_bundled_spec_parse() -> None:
    names = [p.name for p in default_space().params]
    assert names == ["lr", "batch_size", "weight_decay", "optimizer", "arch", "augment"]
    bundled = load_space(Path(__file__).resolve().parents[1] / "pipelines" / "sweep.toml")
    assert bundled.fixed["epochs"] == 3 and {p.name for p in bundled.params} >= {"lr", "arch", "augment"}


@pytest.mark.parametrize(("data", "message"), [
    ({"space": {"lr": {"low": 1e-3, "hihg": 1e-2}}}, "unknown key 'hihg' in \\[space.lr\\]"),
    ({"space": {"learning_rate": {"low": 1, "high": 2}}}, "unknown parameter \\[space.learning_rate\\]"),
    ({"space": {"lr": {"low": 1e-2, "high": 1e-3}}}, "\\[space.lr\\] is an empty range"),
    ({"space": {"arch": {"choices": []}}}, "\\[space.arch\\] choices is empty"),
    ({"space": {"lr": {"low": 0.0, "high": 1.0, "log": True}}}, "\\[space.lr\\] log=true needs low > 0"),
    ({"train": {"out": "x"}, "space": {"lr": {"low": 1e-3, "high": 1e-2}}}, "\\[train\\] key 'out'"),
    ({"trian": {}}, "unknown table \\[trian\\]"),
])
def test_a_bad_space_names_the_key(data: dict, message: str) -> None:
    with pytest.raises(PcamPrepError, match=message):
        parse_space(data)


def read_trials(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "trials.csv").open()))


def test_a_sweep_writes_trials_and_best_and_a_rerun_continues_the_study(built: Path, tmp_path: Path,
                                                                         spec: Path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", "--shards", str(built), "--out", str(out), "--space", str(spec), "--epochs", "1"]
    result = CliRunner().invoke(main, [*args, "--trials", "2"])
    assert result.exit_code == 0, result.output
    assert "| trial | state | best_val_auc | epochs | seconds | lr | optimizer | run |" in result.output
    rows = read_trials(out)
    assert [(r["trial"], r["state"], r["epochs"], r["run"]) for r in rows] == [("0", "complete", "1", "trial-0"),
                                                                              ("1", "complete", "1", "trial-1")]
    best = json.loads((out / "best.json").read_text())
    assert (out / best["checkpoint"]).is_file() and best["best_val_auc"] == max(float(r["best_val_auc"]) for r in rows)
    metrics = json.loads((out / "trial-0" / "metrics.json").read_text())
    assert metrics["config"]["lr"] == pytest.approx(float(rows[0]["lr"]))  # a trial is a normal train run

    result = CliRunner().invoke(main, [*args, "--trials", "3"])  # same study: only the third trial runs
    assert result.exit_code == 0, result.output
    assert [r["trial"] for r in read_trials(out)] == ["0", "1", "2"] and read_trials(out)[:2] == rows
    report = CliRunner().invoke(main, ["stats", str(built), "--report", str(tmp_path / "report"), "--run", str(out)])
    assert report.exit_code == 0, report.output
    assert (tmp_path / "report" / "run_sweep.png").is_file() and (tmp_path / "report" / "run_curves.png").is_file()


def test_an_interrupted_trial_is_recorded_and_resumed_by_the_rerun(built: Path, tmp_path: Path, spec: Path,
                                                                   monkeypatch) -> None:
    real_train = sweep_module.train

    def interrupted_train(config, progress=None):
        def stop(event):
            if event.epoch == 1 and event.record is None:
                raise KeyboardInterrupt  # what the trainer raises after a Ctrl-C, once last.pt is saved
            progress(event)
        return real_train(config, progress=stop)

    config = SweepConfig(shards=built, out=tmp_path / "sweep", trials=1, space=spec, epochs=2)
    monkeypatch.setattr(sweep_module, "train", interrupted_train)
    result = sweep(config)
    assert result.interrupted and [r["state"] for r in result.rows] == ["interrupted"]
    assert (tmp_path / "sweep" / "trial-0" / "last.pt").is_file()
    monkeypatch.setattr(sweep_module, "train", real_train)
    result = sweep(config)
    assert [(r["state"], r["run"]) for r in result.rows] == [("interrupted", "trial-0"), ("complete", "trial-0")]
    assert result.rows[1]["lr"] == result.rows[0]["lr"] and result.rows[1]["epochs"] == 2
    history = json.loads((tmp_path / "sweep" / "trial-0" / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in history] == [1, 2]  # resumed, not restarted


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_trial_reports_each_epoch_and_is_pruned_by_the_pruner(built: Path, tmp_path: Path, spec: Path) -> None:
    config = SweepConfig(shards=built, out=tmp_path / "sweep", space=spec, epochs=3)
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    study.optimize(lambda trial: objective(trial, config, load_space(spec), optuna), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1] and trial.user_attrs["epochs"] == 1  # stopped after epoch 1


def test_bad_sweep_input_is_one_line(built: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[space.lr]\nlow = 1\nhigh = 1\n")
    result = CliRunner().invoke(main, ["sweep", "--shards", str(built), "--out", str(tmp_path / "s"), "--space",
                                       str(bad)])
    assert result.exit_code == 1 and "[space.lr] is an empty range" in result.output
    assert not (tmp_path / "s").exists()  # refused before anything is written


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_cases_in_cpu_smoke_mode(built: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "pipelines" / "bench_gpu.py"
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(script), "--shards", str(built), "--smoke", "--out", str(out),
                           "--archs", "timm:test_efficientnet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| train | timm:test_efficientnet | 8 | resident | no |" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert [(r["kind"], r["data"]) for r in results] == [("train", "streamed"), ("train", "resident"),
                                                         ("predict", "streamed")]
    assert all(r["steps"] == 1 and r["images_per_s"] > 0 for r in results)


def test_the_cli_starts_without_torch_optuna_or_timm() -> None:
    import subprocess
    import sys

    probe = "import sys, pcam_prep.cli; print(sorted({'torch', 'optuna', 'timm'} & set(sys.modules)))"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"  # `pcam-prep build` and `verify` start in well under a second
