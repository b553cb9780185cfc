"""timm backbones, starting weights from a local file (`--init`), and frozen-backbone schedules.

`--arch timm:NAME` is `timm.create_model(NAME, num_classes=1, in_chans=3)` kept whole inside
`TimmNet.body`, so its keys are timm's (and torchvision's, for ResNets) behind a `body.` prefix.
Centre handling: when the model's last feature map is spatial (CNNs: ResNet, EfficientNet,
ConvNeXt, ...), a zero-initialised linear layer on the mean of that map's centre third is added
to timm's own logit: the same centre pooling the built-in models use, so a patch whose centre
is negative can score low even with tumour elsewhere. Token models (ViT) get no centre term.

The head is what a linear probe trains: timm's classifier plus the centre layer (for `small`
and `resnet`, their `head`). Everything else is the backbone.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PcamPrepError
from ..schema import IMAGE_SIZE, centre_window
from .config import TIMM_PREFIX, TrainConfig
from .models import build_model

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise PcamPrepError("timm is not installed: pip install -e '.[timm]' (see the README)") from None
    return timm


def timm_name(arch: str) -> str | None:
    """NAME for arch `timm:NAME`, None for a built-in arch."""
    return arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else None


def check_timm_name(name: str) -> None:
    """Refuse a name timm cannot build, listing the closest ones it can."""
    timm = import_timm()
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else "; `timm.list_models('PATTERN*')` lists them"
    raise PcamPrepError(f"unknown timm model {name!r}{hint}")


class TimmNet(nn.Module):
    """A timm classifier with one logit, its input resized to `input_size`, plus a centre term on spatial maps."""

    def __init__(self, body: nn.Module, input_size: int = IMAGE_SIZE, centre: bool = True) -> None:
        super().__init__()
        self.body = body
        self.input_size = input_size
        self.centre = nn.Linear(body.num_features, 1) if centre else None
        if self.centre is not None:
            nn.init.zeros_(self.centre.weight)  # starts as timm's own model; learns the centre as it trains
            nn.init.zeros_(self.centre.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        features = self.body.forward_features(x)
        logit = self.body.forward_head(features).reshape(-1)
        if self.centre is None:
            return logit  # tokens, not a map: timm's head alone
        h, w = features.shape[-2:]
        centre = features[..., centre_window(h) if h >= 3 else slice(None), centre_window(w) if w >= 3 else slice(None)]
        return logit + self.centre(centre.mean((2, 3))).reshape(-1)


def build_timm(name: str, input_size: int = IMAGE_SIZE, pretrained: bool = False) -> TimmNet:
    """`timm.create_model(name, num_classes=1, in_chans=3)` in a TimmNet; `pretrained` downloads timm's weights."""
    check_timm_name(name)
    timm = import_timm()
    try:
        body = timm.create_model(name, pretrained=pretrained, num_classes=1, in_chans=3)
    except Exception as exc:  # noqa: BLE001 - hub, network and cache errors all mean "no weights"
        if not pretrained:
            raise
        raise PcamPrepError(f"--pretrained: could not get timm's weights for {name} (no network?): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} -- download "
                            "them where there is network and pass --init FILE") from None
    return TimmNet(body, input_size, centre=has_spatial_map(body, input_size))


@torch.no_grad()
def has_spatial_map(body: nn.Module, input_size: int) -> bool:
    """Whether forward_features gives an (N, C, H, W) map (CNNs) rather than tokens (ViTs): one tiny forward."""
    was_training = body.training
    features = body.eval().forward_features(torch.zeros(1, 3, input_size, input_size))
    body.train(was_training)
    return features.ndim == 4 and features.shape[1] == getattr(body, "num_features", -1)


def build_network(arch: str, width: int | None = None, input_size: int = IMAGE_SIZE,
                  pretrained: bool = False) -> nn.Module:
    """Any arch the trainer knows: `small`, `resnet` (models.py) or `timm:NAME`."""
    name = timm_name(arch)
    if name is None:
        return build_model(arch, width)
    return build_timm(name, input_size, pretrained)


def head_names(model: nn.Module) -> set[str]:
    """Parameter and buffer names of the head: what a linear probe trains and what `--init` may re-initialise."""
    if isinstance(model, TimmNet):
        classifier = model.body.get_classifier()
        prefixes = ["centre."]
        prefixes += [f"body.{n}." for n, m in model.body.named_modules() if m is classifier and n]
        # ConvNeXt-style heads hold a norm before the classifier: it belongs to the head too
        head = getattr(model.body, "head", None)
        if isinstance(head, nn.Module) and any(m is classifier for m in head.modules()):
            prefixes.append("body.head.")
    else:
        prefixes = ["head."]
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return {n for n in names if n.startswith(tuple(prefixes))}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, head) parameters, in registration order."""
    head = head_names(model)
    backbone = [p for n, p in model.named_parameters() if n not in head]
    return backbone, [p for n, p in model.named_parameters() if n in head]


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: backbone and head, each with and without weight decay (none on norms and biases)."""
    backbone, head = split_parameters(model)
    groups = []
    for params, lr in ((backbone, config.lr_backbone or config.lr), (head, config.lr)):
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay, "lr": lr},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr}]
    return [g for g in groups if g["params"]]


def frozen_at(config: TrainConfig, epoch: int) -> bool:
    """Whether the backbone is frozen in `epoch` (0-based): from the start until `unfreeze_after`."""
    return config.freeze_backbone and (config.unfreeze_after is None or epoch < config.unfreeze_after)


def set_frozen(model: nn.Module, frozen: bool) -> bool:
    """Stop (or restart) gradients through the backbone; returns whether anything changed."""
    backbone, _ = split_parameters(model)
    changed = any(p.requires_grad == frozen for p in backbone)
    for p in backbone:
        p.requires_grad_(not frozen)
    return changed


def freeze_norms(model: nn.Module) -> None:
    """Put frozen norm layers in eval mode, so BN statistics stay the encoder's (call after .train())."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._NormBase) and own and not any(p.requires_grad for p in own):
            module.eval()


@dataclass(frozen=True)
class InitReport:
    """What `load_init` did: tensors loaded, and the ones skipped with the reason."""

    path: Path
    loaded: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why (a head re-initialised, not in this model)

    def line(self) -> str:
        skipped = "; ".join(f"{k} ({why})" for k, why in self.skipped.items()) or "none"
        return f"--init {self.path}: loaded {len(self.loaded)} tensors; skipped {len(self.skipped)}: {skipped}"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a .pth/.bin/.safetensors file or a pcam-prep checkpoint; never unpickles objects."""
    path = Path(path)
    if not path.is_file():
        raise PcamPrepError(f"--init: {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a bad file is the user's input
            raise PcamPrepError(f"--init: {path} is not a safetensors file: {exc}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an arbitrary pickle or a non-torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PcamPrepError(f"--init: {path} is not a weights file torch can load safely (weights_only): "
                            f"{first}") from None
    return plain_state_dict(data, path)


def plain_state_dict(data: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap {'model'|'state_dict'|'state_dict_ema': sd} and check every value is a tensor."""
    if isinstance(data, Mapping):
        for key in ("model", "state_dict", "state_dict_ema", "model_state_dict"):
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not data:
        raise PcamPrepError(f"--init: {path} holds {type(data).__name__}, not a state dict of tensors")
    bad = next((k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise PcamPrepError(f"--init: {path} is not a plain state dict: {bad!r} is {type(data[bad]).__name__}, "
                            "not a tensor")
    return {k.removeprefix("module."): v for k, v in data.items()}  # a DDP-wrapped model's keys


def _align(source: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source keys renamed to the model's: timm/torchvision keys gain `body.`, or lose it for a built-in model."""
    candidates = [source, {f"body.{k}": v for k, v in source.items()},
                  {k.removeprefix("body."): v for k, v in source.items()}]
    return max(candidates, key=lambda c: len(c.keys() & target.keys()))


def load_init(model: nn.Module, path: Path) -> InitReport:
    """Copy matching tensors from `path` into `model`; head tensors of another shape stay freshly initialised."""
    target = model.state_dict()
    source = _align(read_weights(path), target)
    head = head_names(model)
    loaded, skipped = {}, {}
    for key, tensor in source.items():
        if key not in target:
            skipped[key] = "not in this model"
        elif tensor.shape == target[key].shape:
            loaded[key] = tensor
        elif key in head:
            skipped[key] = f"head re-initialised: {tuple(tensor.shape)} in file, {tuple(target[key].shape)} here"
        else:
            raise PcamPrepError(f"--init: {path} does not fit this model: {key} is {tuple(tensor.shape)} in the "
                                f"file, {tuple(target[key].shape)} here")
    missing = [k for k in target if k not in loaded and k not in head and not k.endswith("num_batches_tracked")]
    if not loaded or missing:
        first = missing[0] if missing else next(iter(target))
        raise PcamPrepError(f"--init: {path} lacks {first} (and {max(0, len(missing) - 1)} more of this model's "
                            f"{len(target)} tensors): weights of another architecture?")
    model.load_state_dict(loaded, strict=False)
    report = InitReport(Path(path), tuple(loaded), skipped)
    logger.info("%s", report.line())
    return report
