"""The bundled trainer and predictor, on real synthetic shards, on CPU.

The quality bar runs the default model (SmallCNN, width 32) for two epochs on 1,000 synthetic
patches (800 train, 200 validate) instead of the issue's 8,000: on a 2-core CPU the model
trains at ~50-60 images/s, so 8,000 would take ~4.5 minutes; the bar is raised from 0.95 to
0.97 to make up for it. Everything else uses the tiny `built` set and a width-4 model.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from pcam_prep import PcamPrepError
from pcam_prep.cli import main
from pcam_prep.loader import BatchLoader, Source, open_source
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.schema import centre_window
from pcam_prep.synth import write_kaggle, write_pcam_h5
from pcam_prep.train.augment import colour_jitter, dihedral, dihedral_codes
from pcam_prep.train.config import TrainConfig
from pcam_prep.train.data import Normalise, ResidentSplit, ShardStream, stream_batches
from pcam_prep.train.loop import lr_factor, train
from pcam_prep.train.metrics import roc_auc
from pcam_prep.train.models import build_model
from pcam_prep.train.predict import load_checkpoint

CPU = torch.device("cpu")
TINY = {"device": "cpu", "width": 4, "batch_size": 16}  # a model small enough for sub-second epochs


@pytest.fixture(scope="module")
def quality(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """1,000 synthetic patches built into shards and the default model trained for two CPU epochs, once."""
    root = tmp_path_factory.mktemp("quality")
    write_kaggle(root / "src", 1000, 50, seed=5)
    build(BuildConfig(src=root / "src", out=root / "out", folds=5, workers=2))
    start = time.perf_counter()
    metrics = train(TrainConfig(shards=root / "out", out=root / "run", epochs=2, batch_size=32, device="cpu"))
    return {"out": root / "out", "run": root / "run", "metrics": metrics, "seconds": time.perf_counter() - start}


@pytest.mark.slow
def test_two_cpu_epochs_of_the_default_model_reach_auc_097(quality: dict) -> None:
    metrics = quality["metrics"]
    print(f"\n2 epochs, 800 train / 200 val: AUC {metrics['best_val_auc']:.4f} in {quality['seconds']:.1f}s, "
          f"{metrics['epochs'][-1]['images_per_s']} img/s, data wait {metrics['epochs'][-1]['data_wait_frac']:.2%}")
    assert metrics["config"]["arch"] == "small" and metrics["config"]["width"] == 32
    assert len(metrics["epochs"]) == 2
    assert metrics["best_val_auc"] >= 0.97


def _centre(images: np.ndarray) -> tuple[slice, slice, slice, slice]:
    window = centre_window(images.shape[1])
    return slice(None), window, window, slice(None)


@pytest.mark.slow
def test_negative_tissue_in_the_centre_window_lowers_the_score(quality: dict) -> None:
    model, ckpt = load_checkpoint(quality["run"] / "best.pt", CPU)
    source = open_source(quality["out"], "train", [0])
    positives = source.take(np.flatnonzero(source.labels == 1)[:24])
    negatives = source.take(np.flatnonzero(source.labels == 0)[:24])
    swapped = positives.copy()
    swapped[_centre(swapped)] = negatives[_centre(negatives)]
    norm = Normalise(ckpt["mean"], ckpt["std"], CPU)
    with torch.no_grad():
        before, after = (torch.sigmoid(model(norm(Normalise.to_unit(torch.from_numpy(x))))).numpy()
                         for x in (positives, swapped))
    assert (after < before).mean() >= 0.8, (before, after)  # tumour straddling the window edge can survive
    assert np.median(after) < 0.5 < np.median(before)


@pytest.mark.slow
def test_a_run_writes_metrics_checkpoints_predictions_and_figures(quality: dict) -> None:
    run = quality["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"epochs", "best_epoch", "best_val_auc", "config"} <= metrics.keys()
    assert set(metrics["epochs"][0]) == {"epoch", "train_loss", "val_loss", "val_auc", "val_acc", "images_per_s",
                                         "data_wait_frac", "seconds"}
    assert 0 <= metrics["epochs"][0]["data_wait_frac"] < 1
    for name in ("curves.png", "roc.png", "confusion.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        assert {"model", "config", "mean", "std", "arch", "epoch"} <= ckpt.keys()
    rows = list(csv.DictReader((run / "val_predictions.csv").open()))
    val = open_source(quality["out"], "train", [0])
    assert sorted(r["id"] for r in rows) == sorted(val.ids)
    assert roc_auc([int(r["label"]) for r in rows], [float(r["prob"]) for r in rows]) == pytest.approx(
        metrics["best_val_auc"], abs=1e-4)


@pytest.mark.parametrize("tta", ["1", "8"])
@pytest.mark.slow
def test_predict_writes_a_kaggle_submission(quality: dict, tmp_path: Path, tta: str) -> None:
    out = tmp_path / "submission.csv"
    result = CliRunner().invoke(main, ["predict", "--shards", str(quality["out"]), "--checkpoint",
                                           str(quality["run"] / "best.pt"), "--out", str(out), "--tta", tta])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "id,label"
    rows = [line.split(",") for line in lines[1:]]
    assert sorted(r[0] for r in rows) == sorted(open_source(quality["out"], "test").ids)
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows)


@pytest.mark.slow
def test_predict_on_a_validation_fold_reports_its_auc(quality: dict, tmp_path: Path) -> None:
    out = tmp_path / "val.csv"
    result = CliRunner().invoke(main, ["predict", "--shards", str(quality["out"]), "--checkpoint",
                                           str(quality["run"] / "best.pt"), "--split", "val", "--fold", "0",
                                           "--out", str(out), "--tta", "2"])
    assert result.exit_code == 0, result.output
    assert "AUC 0.9" in result.output and out.read_text().startswith("id,label,prob\n")


@pytest.mark.slow
def test_predict_scores_a_pcam_valid_split_and_names_unknown_ones(quality: dict, tmp_path: Path) -> None:
    write_pcam_h5(tmp_path / "pcam", 60, 30, 20, seed=3)
    build(BuildConfig(src=tmp_path / "pcam", out=tmp_path / "out", formats=("wds",), workers=1))
    out = tmp_path / "valid.csv"
    args = ["predict", "--shards", str(tmp_path / "out"), "--checkpoint", str(quality["run"] / "best.pt"),
            "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--split", "valid"])
    assert result.exit_code == 0, result.output
    rows = out.read_text().splitlines()
    assert rows[0] == "id,label,prob" and len(rows) - 1 == len(open_source(tmp_path / "out", "valid"))
    assert float(result.output.rsplit("AUC ", 1)[1]) >= 0.9  # the same synthetic label rule: the model carries over
    result = CliRunner().invoke(main, [*args, "--split", "vaild"])
    assert result.exit_code != 0 and "'vaild'" in result.output and "valid" in result.output


# -- the data path through torch --------------------------------------------------------------------------------

def _indices(batches) -> list[np.ndarray]:
    return [b.index for b in batches]


def test_an_epoch_through_torch_covers_every_row_once_with_its_pixels(built: Path) -> None:
    source = open_source(built, "train", [0, 1])
    batches = list(stream_batches(BatchLoader(source, 16, seed=2), CPU))
    seen = np.concatenate(_indices(batches))
    assert sorted(seen) == list(range(len(source)))
    for batch in batches[:3]:
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (96, 96, 3)
        np.testing.assert_array_equal(batch.images.numpy(), source.take(batch.index))
        np.testing.assert_array_equal(batch.labels.numpy(), source.labels[batch.index])


def test_the_loader_yields_torch_tensors_with_labels_and_ids(built: Path) -> None:
    source = open_source(built, "train", [2])
    loader = BatchLoader(source, 16, seed=3)
    for (images, labels, ids), batch in zip(loader.tensors(), loader):
        assert images.dtype == torch.uint8 and labels.dtype == torch.uint8 and images.shape[1:] == (96, 96, 3)
        assert ids == batch.ids and torch.equal(images, torch.from_numpy(source.take(batch.index)))
        assert labels.tolist() == source.labels[batch.index].tolist()


def test_order_follows_seed_and_epoch_and_a_resumed_epoch_gives_the_rest(built: Path) -> None:
    source = open_source(built, "train")
    run = [_indices(stream_batches(BatchLoader(source, 16, seed=1, epoch=e), CPU)) for e in (2, 2, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(run[0], run[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(run[0], run[2]))
    resumed = _indices(stream_batches(BatchLoader(source, 16, seed=1, epoch=2, start_step=3), CPU))
    assert len(resumed) == len(run[0]) - 3
    assert all(np.array_equal(a, b) for a, b in zip(run[0][3:], resumed))


def test_dataloader_workers_split_an_epoch_disjointly_in_the_same_order(built: Path) -> None:
    source = open_source(built, "train")
    loader = BatchLoader(source, 16, seed=4)
    single = _indices(stream_batches(loader, CPU))
    parts = [np.concatenate(loader.plan(w, 2)) for w in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(np.concatenate(parts)) == list(range(len(source)))
    workers = _indices(stream_batches(loader, CPU, workers=2))
    assert len(workers) == len(single) and all(np.array_equal(a, b) for a, b in zip(single, workers))
    direct = list(torch.utils.data.DataLoader(ShardStream(loader), batch_size=None, num_workers=2))
    assert sorted(np.concatenate([d[2].numpy() for d in direct])) == list(range(len(source)))


def test_resident_batches_match_streamed_ones(built: Path) -> None:
    source = open_source(built, "train", [1, 2])
    loader = BatchLoader(source, 16, seed=5, epoch=1)
    streamed = list(stream_batches(loader, CPU))
    resident = list(ResidentSplit(source, CPU, chunk=20).batches(loader.plan()))
    assert len(streamed) == len(resident)
    for a, b in zip(streamed, resident):
        np.testing.assert_array_equal(a.index, b.index)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_a_short_ddp_rank_is_padded_to_the_common_step_count(built: Path) -> None:
    source = open_source(built, "train")
    n = len(source)
    loaders = [BatchLoader(source, (n // 2) // 2, rank=r, world_size=2) for r in range(2)]
    steps = len(loaders[0])
    for loader in loaders:
        plan = loader.plan(pad_to=steps)
        assert len(plan) == steps and set(np.concatenate(loader.plan())) <= set(np.concatenate(plan))
    with pytest.raises(ValueError, match="cannot make"):
        loaders[0].plan(pad_to=steps - 1)


class _Rows(Source):
    """n rows and nothing else: enough for batch plans."""

    def __init__(self, n: int) -> None:
        self.ids, self.labels, self.shape = np.arange(n).astype(str).astype(object), None, (96, 96, 3)


def test_a_short_rank_resumed_at_its_last_step_still_gets_the_padding_batch() -> None:
    # 9 rows, 2 ranks, batches of 4: rank 0 holds 5 rows (2 batches), rank 1 holds 4 (1 batch, padded to 2)
    whole = [BatchLoader(_Rows(9), 4, rank=r, world_size=2).plan(pad_to=2) for r in range(2)]
    assert [len(p) for p in whole] == [2, 2] and len(whole[1][1]) == 1 and whole[1][1][0] == whole[1][0][0]
    for rank in range(2):
        loader = BatchLoader(_Rows(9), 4, rank=rank, world_size=2, start_step=1)
        resumed = loader.plan(pad_to=2)
        assert len(resumed) == 1 and np.array_equal(resumed[0], whole[rank][1])  # the same batch as unbroken


def test_normalise_gives_channels_last_float_with_the_manifest_stats() -> None:
    images = torch.randint(0, 256, (4, 96, 96, 3), dtype=torch.uint8)
    norm = Normalise([0.5, 0.4, 0.3], [0.2, 0.1, 0.3], CPU)
    x = norm(Normalise.to_unit(images))
    assert x.shape == (4, 3, 96, 96) and x.is_contiguous(memory_format=torch.channels_last)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) \
        / torch.tensor([0.2, 0.1, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)


# -- augmentation, models, schedule -----------------------------------------------------------------------------

def test_dihedral_transforms_are_the_eight_symmetries_and_keep_the_centre_window() -> None:
    x = torch.rand(1, 3, 96, 96)
    views = [dihedral(x, k) for k in range(8)]
    assert len({v.numpy().tobytes() for v in views}) == 8
    centre = torch.zeros(1, 1, 96, 96)
    centre[..., 32:64, 32:64] = 1
    assert all(torch.equal(dihedral(centre, k), centre) for k in range(8))
    batch = torch.rand(16, 3, 96, 96)
    codes = dihedral_codes(batch, torch.Generator().manual_seed(0))
    per_sample = dihedral(batch, codes)
    for i, k in enumerate(codes.tolist()):
        assert torch.equal(per_sample[i], dihedral(batch[i : i + 1], k)[0])


def test_colour_jitter_is_reproducible_small_and_in_range() -> None:
    x = torch.rand(8, 3, 96, 96)
    a = colour_jitter(x, torch.Generator().manual_seed(1))
    b = colour_jitter(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    assert 0 < (a - x).abs().mean() < 0.1


@pytest.mark.parametrize("arch", ["small", "resnet"])
def test_models_give_one_logit_per_patch_and_train_in_channels_last(arch: str) -> None:
    model = build_model(arch, width=4).to(memory_format=torch.channels_last)  # few channels: the oneDNN crash case
    logits = model(torch.rand(4, 3, 96, 96).contiguous(memory_format=torch.channels_last))
    assert logits.shape == (4,)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_arch_is_named() -> None:
    with pytest.raises(PcamPrepError, match="'vit'"):
        build_model("vit")


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    factors = [lr_factor(s, 100, 0.1) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:])) and factors[100] == pytest.approx(0.0)


# -- resume, DDP, CLI -------------------------------------------------------------------------------------------

def test_resume_continues_the_epoch_count(built: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(shards=built, out=run, epochs=1, **TINY))
    metrics = train(TrainConfig(shards=built, out=run, epochs=2, resume=True, **TINY))
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("how", ["exception", "sigint"])
def test_an_interrupted_run_resumes_mid_epoch_and_ends_where_an_unbroken_one_does(built: Path, tmp_path: Path,
                                                                                   how: str) -> None:
    config = TrainConfig(shards=built, out=tmp_path / "whole", epochs=2, log_every=1, resident=False, **TINY)
    train(config)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under a shell's background job

    carried_on = []

    def interrupt(event) -> None:
        if event.epoch == 1 and event.step == 2:
            if how == "sigint":  # a real Ctrl-C is deferred: the step finishes, then the loop stops and saves
                os.kill(os.getpid(), signal.SIGINT)
                carried_on.append(True)
            else:
                raise KeyboardInterrupt

    broken = dataclasses.replace(config, out=tmp_path / "broken")
    with pytest.raises(KeyboardInterrupt, match=r"epoch 2/2, step 2 of .*rerun the same command with --resume"):
        train(broken, progress=interrupt)
    last = torch.load(tmp_path / "broken" / "last.pt", weights_only=True)
    assert (last["state"]["epoch"], last["state"]["step"]) == (1, 2)
    assert carried_on == ([True] if how == "sigint" else [])
    assert signal.getsignal(signal.SIGINT) == before  # the handler is gone again
    train(dataclasses.replace(broken, resume=True))
    whole, resumed = (torch.load(tmp_path / name / "last.pt", weights_only=True)["model"] for name in ("whole",
                                                                                                       "broken"))
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key


def test_training_stops_after_patience_epochs_without_a_better_auc(built: Path, tmp_path: Path) -> None:
    # lr ~ 0: the weights barely move, so the val AUC stalls (it moves only with BN statistics)
    metrics = train(TrainConfig(shards=built, out=tmp_path / "run", epochs=8, patience=2, lr=1e-9, **TINY))
    aucs = [e["val_auc"] for e in metrics["epochs"]]
    assert len(aucs) < 8, aucs
    best = metrics["best_epoch"]
    assert len(aucs) == best + 2 and max(aucs[best:]) <= aucs[best - 1], aucs
    with pytest.raises(PcamPrepError, match="patience"):
        TrainConfig(shards=built, patience=-1)


def test_resume_refuses_a_checkpoint_trained_with_other_settings(built: Path, tmp_path: Path) -> None:
    train(TrainConfig(shards=built, out=tmp_path / "run", epochs=1, **TINY))
    changed = TrainConfig(shards=built, out=tmp_path / "run", epochs=2, resume=True, **{**TINY, "batch_size": 8})
    with pytest.raises(PcamPrepError, match="batch_size 16 -> 8"):
        train(changed)


def test_resume_without_a_checkpoint_is_a_clear_error(built: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--shards", str(built), "--out", str(tmp_path / "none"),
                                           "--resume", "--device", "cpu"])
    assert result.exit_code != 0 and "last.pt does not exist" in result.output


@pytest.mark.slow
def test_two_process_gloo_ddp_run_completes_with_uneven_ranks(tmp_path: Path) -> None:
    write_kaggle(tmp_path / "src", 61, 4, seed=7)
    build(BuildConfig(src=tmp_path / "src", out=tmp_path / "out", folds=2, workers=1, formats=("wds",)))
    val_fold = next(v for v in (0, 1) if len(open_source(tmp_path / "out", "train", [1 - v])) % 2)
    train_rows = len(open_source(tmp_path / "out", "train", [1 - val_fold]))
    batch = train_rows // 2  # rank 0 gets batch + 1 rows (two steps), rank 1 batch rows: padded to two steps
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pcam_prep", "train", "--shards", str(tmp_path / "out"), "--out", str(run),
               "--epochs", "2", "--val-fold", str(val_fold), "--width", "4", "--batch-size", str(batch),
               "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and 0 <= metrics["best_val_auc"] <= 1
    rows = (run / "val_predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == len(open_source(tmp_path / "out", "train", [val_fold]))  # gathered from both ranks


def test_bench_loader_prints_one_json_line_ending_in_images_per_s(built: Path) -> None:
    result = CliRunner().invoke(main, ["bench", "loader", "--shards", str(built), "--seconds", "0.2",
                                           "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output)
    assert list(line)[-1] == "images_per_s" and line["images_per_s"] > 0


@pytest.mark.parametrize("args", [["train"], ["predict"], ["bench"], ["bench", "loader"], []])
def test_every_training_command_documents_itself_with_an_example(args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0 and "Example:" in result.output


def test_a_missing_validation_fold_is_named(built: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--shards", str(built), "--out", str(tmp_path / "r"),
                                           "--val-fold", "7", "--device", "cpu"])
    assert result.exit_code != 0 and "--val-fold 7 does not exist" in result.output and "Traceback" not in result.output


# -- metrics ----------------------------------------------------------------------------------------------------

def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=80))
def test_auc_matches_the_pairwise_definition_with_ties(pairs: list[tuple[int, int]]) -> None:
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], dtype=float) / 6  # few distinct values: many ties
    if labels.min() == labels.max():
        assert np.isnan(roc_auc(labels, scores))
    else:
        assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)
