"""`pcam-prep train`, `predict` and `bench loader`: parse options, build a config, call one library function.

Registered on the `pcam-prep` group by cli.py; under torchrun the same command runs as
`torchrun --nproc_per_node 2 -m pcam_prep train --shards OUT`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from ..loader import FORMATS
from ..train.config import ARCHS, DEVICES, OPTIMIZERS, STAIN_AUGMENTS, STAIN_NORMS, PredictConfig, TrainConfig
from .common import Bars, friendly_errors


def _default(config: type, name: str) -> Any:
    return config.__dataclass_fields__[name].default


def _opt(config: type, flag: str, kind: Any, help: str) -> Any:
    """An option whose default is `config`'s field of the same name (--batch-size -> batch_size)."""
    default = _default(config, flag[2:].replace("-", "_"))
    return click.option(flag, type=kind, default=default, show_default=True, help=help)


def _flags(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


shards_option = click.option("--shards", default=Path("shards"), show_default=True,
                             type=click.Path(exists=True, file_okay=False, path_type=Path),
                             help="Built OUT folder (from `pcam-prep build`).")
format_option = click.option("--format", "format", type=click.Choice(list(FORMATS)), default="wds", show_default=True,
                             help="Which built copy to read.")
device_option = click.option("--device", type=click.Choice(DEVICES), default="auto",
                             show_default=True, help="auto: cuda when available.")


@click.command()
@shards_option
@_opt(TrainConfig, "--out", click.Path(file_okay=False, path_type=Path),
      "Run folder for checkpoints, metrics.json, figures.")
@_opt(TrainConfig, "--val-fold", int, "Validation fold; the others train.")
@_opt(TrainConfig, "--epochs", int, "Total epochs; with --resume, more than before stretches the cosine schedule.")
@_opt(TrainConfig, "--arch", str, f"{' | '.join(ARCHS)}: built in (3-block CNN, ResNet-18-like); timm:NAME: any timm "
      "model, e.g. timm:resnet18, timm:efficientnet_b0 (extra `timm`).")
@click.option("--width", type=int, help="First-stage channels  [default: small 32, resnet 64]")
@_opt(TrainConfig, "--batch-size", int, "Images per step per process.")
@_opt(TrainConfig, "--lr", float, "Peak learning rate (warmup, then cosine).")
@_opt(TrainConfig, "--warmup", float, "Share of all steps spent warming up to the peak.")
@_opt(TrainConfig, "--weight-decay", float, "AdamW weight decay.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Dihedral transforms and colour jitter on the device.")
@device_option
@_opt(TrainConfig, "--seed", int, "Seed for init, order, augmentation, dropout.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt, mid-epoch if it was saved mid-epoch.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in OUT (default: refuse).")
@_opt(TrainConfig, "--patience", click.IntRange(min=0), "Stop after N epochs without a better val AUC (0: never).")
@format_option
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes; 0 reads in-process (memory-mapped: fastest).")
@click.option("--resident/--no-resident", default=None,
              help="Keep the uint8 train split on the device  [default: when it fits]")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on CUDA.")
@_opt(TrainConfig, "--checkpoint-every", int, "Also save last.pt every N steps.")
@_opt(TrainConfig, "--input-size", int, "timm models: resize to N x N on the device, after augmentation.")
@click.option("--init", type=click.Path(dir_okay=False, path_type=Path),
              help="Start from local weights: a timm/torchvision state_dict (.pth/.bin/.safetensors) or a "
                   "pcam-prep checkpoint; a classifier head of another shape is re-initialised.")
@click.option("--pretrained", is_flag=True, help="timm models: download timm's hub weights (needs network).")
@click.option("--freeze-backbone", is_flag=True, help="Train only the head: a linear probe on a frozen encoder.")
@click.option("--unfreeze-after", type=int, help="With --freeze-backbone: train everything from epoch E+1 on.")
@click.option("--lr-backbone", type=float, help="Peak learning rate of the backbone  [default: --lr]")
@_opt(TrainConfig, "--optimizer", click.Choice(OPTIMIZERS), "adamw, or sgd with Nesterov momentum 0.9.")
@_opt(TrainConfig, "--stain-norm", click.Choice(STAIN_NORMS), "Map every image's stain onto a reference on the "
      "device (Macenko stain vectors or Reinhard LAB moments), in train and predict.")
@click.option("--stain-ref", help="The --stain-norm reference: a train image id, or a .npy/.tif/.png file  "
                                  "[default: 256 train patches sampled with --seed]")
@_opt(TrainConfig, "--stain-augment", click.Choice(STAIN_AUGMENTS), "hed: jitter each training image's H, E and "
      "DAB concentrations (Tellez et al. 2018); tissue pixels only, never at predict time.")
@_opt(TrainConfig, "--stain-sigma", float, "HED jitter strength: concentration x U(1-s, 1+s) + U(-s, s).")
@_opt(TrainConfig, "--log-every", int, "Read the loss back for the progress bar every N steps (a GPU sync); "
                                        "the image count moves every step.")
@friendly_errors
def train(compile_: bool, **flags: Any) -> None:
    """Train a classifier on built shards; writes checkpoints, metrics.json and figures to OUT.

    The validation fold is held out; AUC is computed over all of it. Run it under torchrun
    for DistributedDataParallel (nccl on CUDA, gloo on CPU): each process reads its own
    slice of every epoch, and only rank 0 writes files.

    \b
    Example:
      pcam-prep train --shards shards/ --out runs/small --epochs 10
      pcam-prep train --shards shards/ --out runs/small --epochs 12 --resume
      torchrun --nproc_per_node 4 -m pcam_prep train --shards shards/ --arch resnet
      pcam-prep train --shards shards/ --arch timm:resnet18 --init resnet18.safetensors --lr-backbone 2e-4
      pcam-prep train --shards shards/ --arch timm:resnet18 --init resnet18.pth --freeze-backbone --unfreeze-after 2
      pcam-prep train --shards shards/ --stain-norm macenko --stain-augment hed --stain-sigma 0.05
    """
    from ..train.loop import train as run_train

    config = TrainConfig(compile=compile_, **_flags(flags))
    main_rank = os.environ.get("RANK", "0") == "0"
    bar = _EpochBar(config.epochs) if main_rank else None
    result = run_train(config, progress=bar)
    if bar is not None:
        bar.close()
    if main_rank:
        click.echo(f"best val AUC {result['best_val_auc']:.4f} at epoch {result['best_epoch']}; run in {config.out}")


class _EpochBar:
    """One tqdm bar per epoch in images, with the running loss; a summary line when an epoch ends."""

    def __init__(self, epochs: int) -> None:
        self.epochs, self.bar, self.epoch = epochs, None, None

    def __call__(self, event: Any) -> None:
        from tqdm.auto import tqdm

        if self.bar is None or event.epoch != self.epoch:
            self.close()
            self.epoch = event.epoch
            self.bar = tqdm(desc=f"epoch {event.epoch + 1}/{self.epochs}", total=event.total or None, unit="img",
                            unit_scale=True, disable=None, file=sys.stderr, leave=False, dynamic_ncols=True,
                            mininterval=0.2)
        self.bar.update(event.images - self.bar.n)
        if event.loss is not None:
            self.bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
        if event.record is not None:
            self.close()
            r = event.record
            click.echo(f"epoch {r['epoch']}/{self.epochs}  train_loss {r['train_loss']:.4f}  "
                       f"val_loss {r['val_loss']:.4f}  val_auc {r['val_auc']:.4f}  val_acc {r['val_acc']:.4f}  "
                       f"{r['images_per_s']:,.0f} img/s  data wait {100 * r['data_wait_frac']:.1f}%  "
                       f"{r['seconds']:.1f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command()
@shards_option
@click.option("--checkpoint", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="best.pt or last.pt from `pcam-prep train`; repeat it to average several models  "
                   f"[default: {_default(TrainConfig, 'out') / 'best.pt'}]")
@click.option("--run", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A `pcam-prep cv` run folder: average its fold models (the fold ensemble).")
@_opt(PredictConfig, "--out", click.Path(dir_okay=False, path_type=Path), "CSV to write.")
@click.option("--tta", type=click.Choice(["1", "2", "4", "8"]), default="1", show_default=True,
              help="Average over this many dihedral views.")
@click.option("--split", default="test", show_default=True,
              help="test: Kaggle submission; val: a labelled train fold, with its AUC; or another split the "
                   "build has (PCam: valid).")
@click.option("--fold", type=int, help="Fold scored with --split val  [default: the checkpoint's val fold]")
@format_option
@device_option
@_opt(PredictConfig, "--batch-size", int, "Images per forward pass.")
@friendly_errors
def predict(tta: str, **flags: Any) -> None:
    """Score the test split with a checkpoint and write the Kaggle submission (id,label).

    label is the predicted probability of tumour in the centre 32x32. With --split val the
    rows of a labelled train fold are scored instead, the CSV is id,label,prob, and the AUC
    is printed. Several --checkpoint options, or --run with a cv run folder, average the
    models' probabilities (TTA inside each model).

    \b
    Example:
      pcam-prep predict --shards shards/ --checkpoint runs/small/best.pt --out submission.csv --tta 8
      pcam-prep predict --shards shards/ --checkpoint runs/small/best.pt --split val --fold 0 --out val.csv
      pcam-prep predict --shards shards/ --run runs/cv --tta 8 --out submission.csv
    """
    from ..train.predict import predict as run_predict

    config = PredictConfig(tta=int(tta), **_flags(flags))
    bars = Bars("img")
    result = run_predict(config, progress=bars)
    bars.close()
    auc = "" if result.auc is None else f"; AUC {result.auc:.4f}"
    click.echo(f"wrote {result.rows + result.filled:,} rows to {result.out} in {result.seconds:.1f}s{auc}")
    if result.filled:
        click.echo(f"{result.filled:,} of them are ids the build rejected (no usable image): given the training "
                   f"prior instead of a prediction; listed in {result.missing}", err=True)


@click.group()
def bench() -> None:
    """Measure parts of the pipeline on their own.

    \b
    Example:
      pcam-prep bench loader --shards shards/ --seconds 5
    """


@bench.command()
@shards_option
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per batch.")
@click.option("--seconds", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="How long to run.")
@format_option
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffle seed.")
@friendly_errors
def loader(shards: Path, batch_size: int, seconds: float, format: str, seed: int) -> None:
    """Read shuffled uint8 train batches and nothing else; print one JSON line ending in images_per_s.

    \b
    Example:
      pcam-prep bench loader --shards shards/ --batch-size 256 --seconds 5 --format wds
    """
    from ..loader import BatchLoader, open_source
    from ..train.data import loader_throughput

    source = open_source(shards, "train", None, format)
    measured = loader_throughput(BatchLoader(source, batch_size, seed=seed), seconds)
    line = {"format": format, "batch_size": batch_size, "images": measured["images"], "seconds": measured["seconds"],
            "images_per_s": measured["images_per_s"]}
    click.echo(json.dumps(line))
