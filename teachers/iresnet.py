"""insightface arcface_torch iResNet, laid out so its ``state_dict`` keys are the published ones.

Follows ``recognition/arcface_torch/backbones/iresnet.py`` (see /work/shared/REFERENCE.md, "Teacher
checkpoints"): a 3x3 stride-1 stem (``conv1``, ``bn1``, ``prelu``), four stages of pre-activation
``IBasicBlock`` (BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the shortcut) at 64, 128,
256, 512 channels, each stage starting with a stride-2 block whose shortcut is ``downsample`` (1x1 conv
stride 2 + BN); then ``bn2``, flatten (C, H, W order), ``fc`` (512*7*7 -> D) and the ``features``
BatchNorm1d, whose output is the unnormalised embedding. Every BatchNorm uses eps 1e-5.

What upstream has that a frozen teacher does not need: the dropout before ``fc`` (identity in eval) and
the ``fp16`` flag, which wraps the convolutional trunk in CUDA autocast and keeps ``fc`` and ``features`` in
float32 (:class:`TeacherWrapper` does the same with the precision it is given, through :meth:`IResNet.forward_features`
and :meth:`IResNet.forward_head`). Input: RGB, ``(x/255 - 0.5)/0.5``, i.e. our [-1, 1] batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["IRESNET_LAYERS", "IResNet", "iresnet_block_counts"]

# blocks per stage, from arcface_torch's iresnet{18,34,50,100,200} constructors
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
_STAGE_WIDTHS = (64, 128, 256, 512)
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5)


class IBasicBlock(nn.Module):
    """Pre-activation basic block; the stride sits on the second conv, as upstream."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = _bn(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = _bn(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = _bn(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), _bn(channels))

    def forward(self, x: Tensor) -> Tensor:
        """``N x C_in x H x W`` -> ``N x C x H/s x W/s``."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """arcface_torch ``IResNet`` with ``IBasicBlock``: ``N x 3 x 112 x 112`` -> ``N x num_features``."""

    def __init__(self, layers: Iterable[int], num_features: int = 512) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = _bn(64)
        self.prelu = nn.PReLU(64)
        in_channels = 64
        for stage, (n, width) in enumerate(zip(layers, _STAGE_WIDTHS), start=1):
            blocks = [IBasicBlock(in_channels, width, 2)] + [IBasicBlock(width, width, 1) for _ in range(n - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            in_channels = width
        self.bn2 = _bn(512)
        self.fc = nn.Linear(512 * 7 * 7, num_features)  # 112 / 2**4 = 7
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward_features(self, x: Tensor) -> Tensor:
        """The convolutional trunk: ``N x 3 x 112 x 112`` -> ``N x 25088`` (``bn2`` output, flattened C, H, W).

        arcface_torch's ``fp16`` path runs exactly this part under autocast and :meth:`forward_head` in
        float32 (timm's ``forward_features`` / ``forward_head`` names, so one split serves every teacher)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.bn2(x), 1)

    def forward_head(self, x: Tensor) -> Tensor:
        """``N x 25088`` -> ``N x num_features``: ``fc`` then the ``features`` BatchNorm."""
        return self.features(self.fc(x))

    def forward(self, x: Tensor) -> Tensor:
        """``N x 3 x 112 x 112`` RGB in [-1, 1] -> ``N x num_features`` (the ``features`` BN output)."""
        return self.forward_head(self.forward_features(x))


def iresnet_block_counts(keys: Iterable[str]) -> tuple[int, ...]:
    """Blocks per stage read from ``layer{s}.{i}.*`` keys (``()`` when there are none)."""
    counts = [0, 0, 0, 0]
    for key in keys:
        m = _BLOCK_KEY.match(key)
        if m:
            stage, index = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], index + 1)
    return tuple(counts) if any(counts) else ()
