"""Models for 96x96 patches, built from scratch (no downloads): a small CNN and a ResNet-18-like net.

Both end in `CentreHead`. The PCam label only asks whether tumour lies in the centre 32x32, and
synthetic (and real) negatives often hold tumour elsewhere; a head that only average-pools the
whole map cannot tell the two apart, so it also pools the centre third of the map.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..errors import PcamPrepError
from ..schema import centre_window


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CentreHead(nn.Module):
    """[mean over the whole map, mean over its centre third] -> dropout -> one logit."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        centre = x[..., centre_window(h), centre_window(w)]  # the label's window, on the feature map
        pooled = torch.cat([x.mean((2, 3)), centre.mean((2, 3))], dim=1)
        return self.fc(self.drop(pooled)).squeeze(1)


class SmallCNN(nn.Module):
    """Three blocks of (conv-bn-relu) x2 + 2x2 max-pool at width, 2x and 4x channels (96 -> 12 px)."""

    def __init__(self, width: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        self.features = nn.Sequential(*[
            nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout), nn.MaxPool2d(2))
            for cin, cout in itertools.pairwise(chans)
        ])
        self.head = CentreHead(chans[-1], dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut; the last BN starts at zero.

    A downsampling shortcut is 2x2 average pooling then a 1x1 conv (ResNet-D): it sees every
    pixel, unlike a strided 1x1 conv, and it avoids oneDNN's strided 1x1 NHWC backward, which
    crashes on CPU with few input channels (uxlfoundation/oneDNN#6035; seen with torch 2.13).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        nn.init.zeros_(self.body[-1].weight)  # each block starts as the identity: trains stably without warmup tricks
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            pool = nn.AvgPool2d(stride, ceil_mode=True) if stride != 1 else nn.Identity()
            self.shortcut = nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18 layout (2-2-2-2 BasicBlocks) for 96x96: a stride-2 3x3 stem and no max-pool (96 -> 6 px)."""

    def __init__(self, width: int = 64, dropout: float = 0.2, layers: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        blocks: list[nn.Module] = [conv_bn_relu(3, width, stride=2)]
        cin = width
        for stage, repeats in enumerate(layers):
            cout = width * 2**stage
            for i in range(repeats):
                blocks.append(BasicBlock(cin, cout, stride=2 if stage and i == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*blocks)
        self.head = CentreHead(cin, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODELS = {"small": SmallCNN, "resnet": ResNet}
DEFAULT_WIDTHS = {"small": 32, "resnet": 64}


def build_model(arch: str, width: int | None = None) -> nn.Module:
    """A freshly initialised model by name; `width` overrides the arch's first-stage channels."""
    if arch not in MODELS:
        raise PcamPrepError(f"unknown arch {arch!r}; choose from {', '.join(MODELS)}")
    if width is not None and (not isinstance(width, int) or width < 1):
        raise PcamPrepError(f"width must be a positive integer, got {width!r}")
    model = MODELS[arch](width=width or DEFAULT_WIDTHS[arch])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model
