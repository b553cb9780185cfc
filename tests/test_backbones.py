"""timm backbones, `--init` weights, frozen-backbone schedules and `--input-size`, on tiny timm models.

timm's `test_*` models (a few hundred thousand parameters) stand in for real ones: the code
path is the same `timm.create_model`. Weights for `--init` are made here and saved to tmp_path;
nothing is downloaded.
"""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pcam_prep import PcamPrepError
from pcam_prep.cli import main
from pcam_prep.loader import open_source
from pcam_prep.pipeline import build
from pcam_prep.pipeline.config import BuildConfig
from pcam_prep.schema import centre_window
from pcam_prep.synth import write_kaggle
from pcam_prep.train.backbones import (
    TimmNet,
    build_network,
    frozen_at,
    head_names,
    load_init,
    read_weights,
    split_parameters,
)
from pcam_prep.train.config import TrainConfig
from pcam_prep.train.data import Normalise
from pcam_prep.train.loop import train
from pcam_prep.train.predict import load_checkpoint

timm = pytest.importorskip("timm")

CPU = torch.device("cpu")
TIMM = {"device": "cpu", "batch_size": 16, "arch": "timm:test_resnet"}


def timm_weights(tmp_path: Path, name: str = "test_resnet", suffix: str = ".pth") -> tuple[Path, dict]:
    """An ImageNet-shaped (1000-class) state dict of a timm model, saved like a downloaded weights file."""
    torch.manual_seed(123)
    state = timm.create_model(name, num_classes=1000).state_dict()
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path, state


def backbone_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_init_loads_every_backbone_tensor_and_reinitialises_the_other_shaped_head(tmp_path: Path, suffix: str,
                                                                                 caplog) -> None:
    path, saved = timm_weights(tmp_path, suffix=suffix)
    model = build_network("timm:test_resnet")
    with caplog.at_level(logging.INFO, logger="pcam_prep.train.backbones"):
        report = load_init(model, path)
    loaded = model.state_dict()
    for key, tensor in saved.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[f"body.{key}"], tensor), key
    assert set(report.skipped) == {"body.fc.weight", "body.fc.bias"}
    assert "head re-initialised: (1000, 96) in file, (1, 96) here" in report.skipped["body.fc.weight"]
    assert loaded["body.fc.weight"].shape == (1, 96)
    assert f"--init {path}: loaded {len(saved) - 2} tensors; skipped 2: " in caplog.text
    assert "body.fc.weight (head re-initialised" in caplog.text


def test_a_frozen_backbone_does_not_change_and_unfreezing_trains_it(built: Path, tmp_path: Path) -> None:
    path, saved = timm_weights(tmp_path)
    run = tmp_path / "run"
    args = ["train", "--shards", str(built), "--out", str(run), "--arch", "timm:test_resnet", "--device", "cpu",
            "--batch-size", "16", "--init", str(path), "--freeze-backbone", "--unfreeze-after", "1",
            "--lr-backbone", "1e-3", "--epochs", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    after_probe = torch.load(run / "last.pt", weights_only=True)["model"]
    for key, tensor in backbone_of(saved).items():  # weights and BN statistics alike
        assert torch.equal(after_probe[f"body.{key}"], tensor), key
    assert not torch.equal(after_probe["centre.weight"], torch.zeros(1, 96))  # the head did train

    result = CliRunner().invoke(main, [*args[:-1], "2", "--resume"])  # epoch 2: everything trains
    assert result.exit_code == 0, result.output
    fine_tuned = torch.load(run / "last.pt", weights_only=True)
    assert not torch.equal(fine_tuned["model"]["body.conv1.0.weight"], saved["conv1.0.weight"])
    groups = fine_tuned["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 1e-3, 2e-3, 2e-3]  # backbone, then head (--lr)
    model, ckpt = load_checkpoint(run / "best.pt", CPU)  # predict rebuilds the timm model from the checkpoint
    assert isinstance(model, TimmNet) and ckpt["arch"] == "timm:test_resnet"


def test_freeze_schedule_and_head_split() -> None:
    config = TrainConfig(shards=Path("x"), freeze_backbone=True, unfreeze_after=2)
    assert [frozen_at(config, e) for e in range(4)] == [True, True, False, False]
    assert not frozen_at(TrainConfig(shards=Path("x")), 0)
    model = build_network("timm:test_efficientnet")
    assert head_names(model) == {"body.classifier.weight", "body.classifier.bias", "centre.weight", "centre.bias"}
    backbone, head = split_parameters(model)
    assert len(head) == 4 and len(backbone) + 4 == len(list(model.parameters()))
    assert head_names(build_network("small", 4)) == {"head.fc.weight", "head.fc.bias"}


def test_input_size_resizes_on_the_device_and_is_kept_in_the_checkpoint(built: Path, tmp_path: Path) -> None:
    model = build_network("timm:test_resnet", input_size=64)
    seen = []
    model.body.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    assert model(torch.zeros(2, 3, 96, 96)).shape == (2,) and seen == [64]
    train(TrainConfig(shards=built, out=tmp_path / "run", epochs=1, input_size=64, **TIMM))
    reloaded, ckpt = load_checkpoint(tmp_path / "run" / "best.pt", CPU)
    assert ckpt["config"]["input_size"] == 64 and reloaded.input_size == 64


def test_a_pcam_prep_checkpoint_initialises_a_new_run(built: Path, tmp_path: Path) -> None:
    train(TrainConfig(shards=built, out=tmp_path / "a", epochs=1, device="cpu", width=4, batch_size=16))
    model = build_network("small", 4)
    load_init(model, tmp_path / "a" / "best.pt")
    saved = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


class NotWeights:
    pass


def test_bad_init_files_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    model = build_network("timm:test_resnet")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with open(tmp_path / "object.pth", "wb") as fh:
        pickle.dump({"model": NotWeights()}, fh, protocol=2)  # an arbitrary object: weights_only refuses to build it
    torch.save({"conv1.weight": torch.zeros(3), "epoch": 3}, tmp_path / "mixed.pth")
    torch.save({**timm.create_model("test_resnet").state_dict(), "conv1.0.weight": torch.zeros(24, 3, 3, 3)},
               tmp_path / "shape.pth")
    torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / "other.pth")
    torch.save({"conv1.0.weight": model.state_dict()["body.conv1.0.weight"]}, tmp_path / "part.pth")
    cases = {"missing.pth": "does not exist", "text.pth": "not a weights file torch can load safely",
             "object.pth": "not a weights file torch can load safely", "mixed.pth": "'epoch' is int, not a tensor",
             "shape.pth": r"body.conv1.0.weight is \(24, 3, 3, 3\) in the file",
             "other.pth": r"does not fit this model: body.bn1.weight is \(24,\)",
             "part.pth": r"lacks body.conv1.1.weight \(and 73 more.*another architecture"}
    for name, pattern in cases.items():
        with pytest.raises(PcamPrepError, match=f"^--init: {tmp_path / name}.* {pattern}"):
            load_init(model, tmp_path / name)
    assert read_weights(tmp_path / "shape.pth")["conv1.0.weight"].shape == (24, 3, 3, 3)


def test_bad_timm_options_are_named(built: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(PcamPrepError, match="unknown timm model 'resnet_18'; closest: resnet18"):
        build_network("timm:resnet_18")
    with pytest.raises(PcamPrepError, match="input_size must be an integer >= 32, got 16"):
        TrainConfig(shards=built, arch="timm:test_resnet", input_size=16)
    with pytest.raises(PcamPrepError, match="only applies to timm models"):
        TrainConfig(shards=built, input_size=128)
    with pytest.raises(PcamPrepError, match="arch must be one of"):
        TrainConfig(shards=built, arch="timm:")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    result = CliRunner().invoke(main, ["train", "--shards", str(built), "--out", str(tmp_path / "p"), "--device",
                                       "cpu", "--arch", "timm:test_resnet", "--pretrained"])
    assert result.exit_code == 1 and "--pretrained: could not get timm's weights for test_resnet" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def centre_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The quality set of test_train (1,000 patches) and a tiny timm EfficientNet trained two epochs on it."""
    root = tmp_path_factory.mktemp("timm-centre")
    write_kaggle(root / "src", 1000, 10, seed=5)
    build(BuildConfig(src=root / "src", out=root / "out", folds=5, workers=2, formats=("wds",)))
    start = time.perf_counter()
    metrics = train(TrainConfig(shards=root / "out", out=root / "run", epochs=2, batch_size=32, device="cpu",
                                arch="timm:test_efficientnet"))
    return {"out": root / "out", "run": root / "run", "metrics": metrics, "seconds": time.perf_counter() - start}


@pytest.mark.slow
def test_a_timm_model_scores_the_centre_window(centre_run: dict) -> None:
    """test_train's centre test on a timm model: negative tissue pasted over a positive's centre lowers its score."""
    print(f"\ntimm:test_efficientnet, 2 epochs: AUC {centre_run['metrics']['best_val_auc']:.4f} in "
          f"{centre_run['seconds']:.1f}s")
    assert centre_run["metrics"]["best_val_auc"] >= 0.9
    model, ckpt = load_checkpoint(centre_run["run"] / "best.pt", CPU)
    source = open_source(centre_run["out"], "train", [0])
    positives = source.take(np.flatnonzero(source.labels == 1)[:24])
    negatives = source.take(np.flatnonzero(source.labels == 0)[:24])
    window = centre_window(96)
    swapped = positives.copy()
    swapped[:, window, window] = negatives[:, window, window]
    norm = Normalise(ckpt["mean"], ckpt["std"], CPU)
    with torch.no_grad():
        before, after = (torch.sigmoid(model(norm(Normalise.to_unit(torch.from_numpy(x))))).numpy()
                         for x in (positives, swapped))
    assert (after < before).mean() >= 0.8, (before, after)
    assert np.median(after) < np.median(before) - 0.15, (before, after)
