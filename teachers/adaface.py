"""AdaFace's IR backbones (mk-minchul/AdaFace ``net.py``), laid out so the state-dict keys are upstream's.

``input_layer`` = (3x3 conv 3->64, BN, PReLU); ``body`` = a flat Sequential of ``BasicBlockIR``, stages of
64, 128, 256, 512 channels, each stage's first block with stride 2; ``output_layer`` = (BN2d, Dropout,
Flatten, Linear 512*7*7 -> 512, BatchNorm1d without affine parameters). A block is
``res_layer`` = (BN, 3x3 conv, BN, PReLU, 3x3 conv (stride), BN) plus ``shortcut_layer``: a 1x1 conv (stride)
+ BN where the channel count changes, else a parameter-free ``MaxPool2d(1, stride)`` (a strided
subsample; in IR-18/50/101 only the first block of stage 1 has it with stride 2). BatchNorm eps is
PyTorch's default 1e-5.

Upstream's forward returns ``(x / ||x||, ||x||)``; the embedding the teacher returns is their product,
i.e. the ``output_layer`` output itself. AdaFace was trained on BGR input, ``(x/255 - 0.5)/0.5``; the
caller (:class:`teachers.base.Teacher` with ``bgr=True``) flips our RGB batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch.nn as nn
from torch import Tensor

__all__ = ["ADAFACE_LAYERS", "AdaFaceIR", "adaface_block_counts"]

# blocks per stage, from net.py's get_blocks(num_layers); AdaFace names num_layers=100 "ir_101"
ADAFACE_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "ir_18": (2, 2, 2, 2),
    "ir_34": (3, 4, 6, 3),
    "ir_50": (3, 4, 14, 3),
    "ir_101": (3, 13, 30, 3),
}
_STAGE_WIDTHS = (64, 128, 256, 512)
_BODY_KEY = re.compile(r"^body\.(\d+)\.")
_SHORTCUT_CONV = re.compile(r"^body\.(\d+)\.shortcut_layer\.0\.weight$")


class BasicBlockIR(nn.Module):
    """IR basic block: ``N x C_in x H x W`` -> ``N x C x H/s x W/s``."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        if in_channels == channels:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIR(nn.Module):
    """AdaFace ``Backbone(input_size=(112, 112), mode="ir")``: ``N x 3 x 112 x 112`` BGR -> ``N x D``."""

    def __init__(self, layers: Iterable[int], embed_dim: int = 512) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        blocks: list[nn.Module] = []
        in_channels = 64
        for n, width in zip(layers, _STAGE_WIDTHS):
            blocks += [BasicBlockIR(in_channels, width, 2)] + [BasicBlockIR(width, width, 1) for _ in range(n - 1)]
            in_channels = width
        self.body = nn.Sequential(*blocks)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, embed_dim),
            nn.BatchNorm1d(embed_dim, affine=False),
        )

    def forward_features(self, x: Tensor) -> Tensor:
        """The convolutional trunk: ``N x 3 x 112 x 112`` BGR -> ``N x 25088`` (``output_layer``'s BatchNorm2d,
        dropout and flatten included, as arcface_torch's iResNet keeps ``bn2`` in its autocast part)."""
        x = self.body(self.input_layer(x))
        for layer in self.output_layer[:3]:
            x = layer(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        """``N x 25088`` -> ``N x D``: the output layer's Linear and BatchNorm1d."""
        for layer in self.output_layer[3:]:
            x = layer(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """``N x 3 x 112 x 112`` BGR in [-1, 1] -> ``N x D`` = upstream's ``normalised * norm``."""
        return self.forward_head(self.forward_features(x))


def adaface_block_counts(keys: Iterable[str] | Mapping[str, object]) -> tuple[int, ...]:
    """Blocks per stage read from ``body.{k}.*`` keys (``()`` when there are none).

    ``body`` is flat, so stages are found where a block has a conv shortcut (the channel count
    changes: first block of stages 2-4); stage 1 starts at block 0, whose shortcut is a MaxPool.
    """
    indices: set[int] = set()
    starts = {0}
    for key in keys:
        m = _BODY_KEY.match(key)
        if m:
            indices.add(int(m.group(1)))
        m = _SHORTCUT_CONV.match(key)
        if m:
            starts.add(int(m.group(1)))
    if not indices:
        return ()
    bounds = sorted(starts) + [max(indices) + 1]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))
