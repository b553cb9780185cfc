"""Typed, frozen settings for `train` and `predict`; the resolved one is saved in every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PcamPrepError
from ..loader import FORMATS
from ..stain import METHODS as STAIN_METHODS

ARCHS = ("small", "resnet")
TIMM_PREFIX = "timm:"  # --arch timm:NAME builds timm.create_model(NAME) (extra `timm`)
OPTIMIZERS = ("adamw", "sgd")
MIN_INPUT_SIZE = 32
DEVICES = ("auto", "cpu", "cuda")
TTA_CHOICES = (1, 2, 4, 8)
STAIN_NORMS = ("none", *STAIN_METHODS)
STAIN_AUGMENTS = ("none", "hed")


@dataclass(frozen=True)
class TrainConfig:
    shards: Path  # built OUT folder: manifest.json plus wds/, pcam.zarr or pcam.h5
    out: Path = Path("runs/train")  # run folder: checkpoints, metrics.json, figures, val predictions
    val_fold: int = 0  # validation fold; every other fold trains
    epochs: int = 10  # total epochs; a resumed run continues until this many are done
    arch: str = "small"  # small: 3-block CNN (default) | resnet: ResNet-18-like
    width: int | None = None  # channels of the first stage; None: the arch's own (small 32, resnet 64)
    batch_size: int = 256  # per process: under torchrun the global batch is this x world size
    lr: float = 2e-3  # peak learning rate, reached after the warmup, then cosine to zero
    warmup: float = 0.1  # share of all steps spent warming up linearly from zero
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not applied to norms and biases)
    augment: bool = True  # dihedral transforms and colour jitter, per sample, on the device
    device: str = "auto"  # auto: cuda when available, else cpu
    seed: int = 0  # model init, batch order, augmentation and dropout all follow from it
    resume: bool = False  # continue from OUT/last.pt (model, optimiser, schedule, step, RNG state)
    overwrite: bool = False  # replace a run already in OUT instead of refusing
    patience: int = 5  # stop after this many epochs without a better val AUC; 0: never stop early
    format: str = "wds"  # which built copy to read: wds | zarr | hdf5
    workers: int = 0  # DataLoader worker processes; 0 reads in-process (memory-mapped: the fastest)
    resident: bool | None = None  # keep the uint8 train split on the device; None: when it fits
    compile: bool = False  # torch.compile the model (slow first steps, faster after)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    checkpoint_every: int = 500  # also save last.pt every N steps mid-epoch (and on Ctrl-C)
    log_every: int = 20  # read the loss back for the progress bar every N steps (a GPU sync)
    input_size: int = 96  # timm models only: resize on the device (bilinear, after augmentation) to N x N
    init: Path | None = None  # start from these weights: a state_dict (.pth/.bin/.safetensors) or a checkpoint
    pretrained: bool = False  # timm models only: download timm's hub weights (needs network)
    freeze_backbone: bool = False  # train only the head (a linear probe: frozen encoder, BN statistics kept)
    unfreeze_after: int | None = None  # with freeze_backbone: train everything from this epoch on
    lr_backbone: float | None = None  # peak learning rate of everything but the head; None: lr
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, Nesterov); neither decays norms and biases
    stain_norm: str = "none"  # none | macenko | reinhard: map every image's stain onto a reference (predict too)
    stain_ref: str | None = None  # the reference: a train image id or a .npy/.tif/.png file; None: 256 train patches
    stain_augment: str = "none"  # none | hed: Tellez HED jitter of each training image's stain concentrations
    stain_sigma: float = 0.05  # HED jitter: concentration x U(1-s, 1+s) + U(-s, s), on scikit-image's rgb2hed scale

    def __post_init__(self) -> None:
        check_arch(self.arch)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self._check_transfer()
        self._check_stain()
        _check_choice("device", self.device, DEVICES)
        _check_choice("format", self.format, FORMATS)
        _check_positive(epochs=self.epochs, batch_size=self.batch_size, checkpoint_every=self.checkpoint_every,
                        log_every=self.log_every)
        _check_positive(width=self.width, allow_none=True)
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise PcamPrepError(f"patience must be an integer >= 0 (0: never stop early), got {self.patience!r}")
        if self.val_fold < 0:
            raise PcamPrepError(f"val_fold must be >= 0, got {self.val_fold!r}")
        if self.workers < 0:
            raise PcamPrepError(f"workers must be >= 0, got {self.workers!r}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup < 1:
            raise PcamPrepError(f"need lr > 0, weight_decay >= 0 and 0 <= warmup < 1; got lr={self.lr!r}, "
                                f"weight_decay={self.weight_decay!r}, warmup={self.warmup!r}")
        if self.resident and self.workers:
            raise PcamPrepError(f"--resident keeps the data on the device, so --workers {self.workers} has nothing "
                                "to do: pass one or the other")

    def _check_transfer(self) -> None:
        timm = self.arch.startswith(TIMM_PREFIX)
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or \
                self.input_size < MIN_INPUT_SIZE:
            raise PcamPrepError(f"input_size must be an integer >= {MIN_INPUT_SIZE}, got {self.input_size!r}")
        if self.input_size != 96 and not timm:
            raise PcamPrepError(f"--input-size {self.input_size} only applies to timm models; {self.arch} is built "
                                "for 96x96")
        if self.pretrained and not timm:
            raise PcamPrepError(f"--pretrained asks timm for weights; {self.arch} is not a timm model")
        if self.pretrained and self.init is not None:
            raise PcamPrepError(f"pass --pretrained or --init {self.init}, not both")
        if self.unfreeze_after is not None:
            _check_positive(unfreeze_after=self.unfreeze_after)
            if not self.freeze_backbone:
                raise PcamPrepError(f"--unfreeze-after {self.unfreeze_after} needs --freeze-backbone")
        if self.lr_backbone is not None and not self.lr_backbone > 0:
            raise PcamPrepError(f"lr_backbone must be > 0, got {self.lr_backbone!r}")
        if self.width is not None and timm:
            raise PcamPrepError(f"--width only applies to small and resnet; {self.arch} has its own widths")

    def _check_stain(self) -> None:
        _check_choice("stain_norm", self.stain_norm, STAIN_NORMS)
        _check_choice("stain_augment", self.stain_augment, STAIN_AUGMENTS)
        if self.stain_ref is not None and self.stain_norm == "none":
            raise PcamPrepError(f"--stain-ref {self.stain_ref} is the reference of --stain-norm: pass that too")
        if isinstance(self.stain_sigma, bool) or not isinstance(self.stain_sigma, int | float) or \
                not 0 < self.stain_sigma <= 0.5:
            raise PcamPrepError(f"stain_sigma must be in (0, 0.5], got {self.stain_sigma!r}")

    def as_dict(self) -> dict[str, Any]:
        return jsonable(self)


def check_arch(arch: Any) -> None:
    """small, resnet or timm:NAME (whether NAME exists is checked when the model is built)."""
    if not isinstance(arch, str) or not (arch in ARCHS or (arch.startswith(TIMM_PREFIX) and arch[len(TIMM_PREFIX):])):
        raise PcamPrepError(f"arch must be one of {', '.join(ARCHS)} or {TIMM_PREFIX}NAME; got {arch!r}")


@dataclass(frozen=True)
class PredictConfig:
    shards: Path  # built OUT folder to score
    checkpoint: Path | tuple[Path, ...] = ()  # best.pt/last.pt of `train`; several: their probabilities averaged
    out: Path = Path("submission.csv")  # CSV: id,label (test) or id,label,prob (val)
    split: str = "test"  # test: Kaggle submission | val: a labelled train fold | any other built split (PCam valid)
    fold: int | None = None  # the fold scored with split=val; default: the checkpoint's val fold
    tta: int = 1  # average over the first 1, 2, 4 or 8 dihedral transforms
    format: str = "wds"  # which built copy to read: wds | zarr | hdf5
    device: str = "auto"  # auto: cuda when available, else cpu
    batch_size: int = 512  # images per forward pass
    run: Path | None = None  # a `cv` run folder: ensemble every fold's best.pt (instead of checkpoint)

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint, (str, Path)):
            object.__setattr__(self, "checkpoint", (Path(self.checkpoint),))  # one checkpoint or several
        if self.run is not None and self.checkpoint:
            raise PcamPrepError("pass --run (a cv run's fold models) or --checkpoint, not both")
        if not self.split or self.split == "train":
            raise PcamPrepError(f"split must be test, val (a train fold) or another built split; got {self.split!r}")
        _check_choice("device", self.device, DEVICES)
        _check_choice("format", self.format, FORMATS)
        _check_choice("tta", self.tta, TTA_CHOICES)
        _check_positive(batch_size=self.batch_size)
        if self.fold is not None and self.split != "val":
            raise PcamPrepError(f"--fold {self.fold} only applies to --split val")


def jsonable(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready values (paths become strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise PcamPrepError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_positive(allow_none: bool = False, **values: Any) -> None:
    for name, value in values.items():
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PcamPrepError(f"{name} must be a positive integer, got {value!r}")
