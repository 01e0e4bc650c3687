"""The one interface every teacher has, whatever file it came from.

A :class:`Teacher` takes what the student takes (an RGB float batch ``N x 3 x H x W`` in [-1, 1]) and
returns the teacher's unnormalised embedding ``N x D``. Everything format-specific (channel order,
value range, input size) is done inside, so the trainer never needs to know where a teacher came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Teacher", "input_affine"]


def input_affine(
    mean: Sequence[float], std: Sequence[float], max_value: float = 1.0
) -> tuple[list[float], list[float]]:
    """Per-channel ``(scale, shift)`` that turns our [-1, 1] input into ``(x01 * max_value - mean) / std``.

    ``x01 = (x + 1) / 2`` is the image in [0, 1]; ``max_value`` is 255 for conventions written in
    pixel units (insightface's ``(x - 127.5) / 127.5``), 1 for timm's ``mean``/``std`` in [0, 1] units.
    """
    half = max_value / 2.0
    scale = [half / s for s in std]
    shift = [(half - m) / s for m, s in zip(mean, std)]
    return scale, shift


class Teacher(nn.Module):
    """A frozen face-recognition model: RGB ``N x 3 x H x W`` in [-1, 1] -> unnormalised ``N x D`` float.

    Args:
        net: the model proper, fed the converted batch; returns ``N x D``.
        embed_dim: ``D``.
        input_size: ``(3, H, W)`` the net was trained at; other sizes are resized bilinearly first.
        info: the ``teacher_info`` dict (format, architecture, depth, parameters, input, ...).
        bgr: flip the channels to BGR before ``net`` (AdaFace was trained on OpenCV's BGR arrays).
        scale, shift: per-channel ``x * scale + shift`` applied after the flip (``None``: identity,
            i.e. ``net`` takes our [-1, 1] input as is).

    The module is always in eval mode (``.train()`` is a no-op, so a parent's ``.train()`` cannot turn
    its BatchNorm layers back to batch statistics) and none of its parameters require grad.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        embed_dim: int,
        input_size: tuple[int, int, int],
        info: dict[str, Any],
        bgr: bool = False,
        scale: Sequence[float] | None = None,
        shift: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.embed_dim = int(embed_dim)
        self.input_size = tuple(int(s) for s in input_size)
        self.bgr = bool(bgr)
        self.teacher_info = dict(info)
        self.teacher_info.setdefault("embed_dim", self.embed_dim)
        self.teacher_info.setdefault("input_size", self.input_size)
        identity = scale is None or (all(s == 1.0 for s in scale) and all(b == 0.0 for b in (shift or [0.0])))
        self.has_affine = not identity
        # non-persistent: the input convention is code, not weights, and must not leak into a state dict
        self.register_buffer("in_scale", torch.tensor(scale or [1.0] * 3).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", torch.tensor(shift or [0.0] * 3).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval mode whatever ``mode`` says: a teacher's BatchNorm must keep its running stats."""
        return super().train(False)

    def prepare(self, x: Tensor) -> Tensor:
        """Convert ``N x 3 x H x W`` RGB [-1, 1] to what ``net`` takes (size, channel order, range)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"teacher expects an N x 3 x H x W batch, got shape {tuple(x.shape)}")
        size = self.input_size[1:]
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        if self.bgr:
            x = x.flip(1)
        if self.has_affine:
            x = x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """``N x 3 x H x W`` RGB in [-1, 1] -> ``N x embed_dim`` unnormalised embeddings."""
        return self.net(self.prepare(x))

    @property
    def has_head(self) -> bool:
        """Whether the net splits into :meth:`forward_features` and :meth:`forward_head` (``forward`` = head of
        features): the face iResNets and every timm model do; an ONNX session does not."""
        net = self.net
        return callable(getattr(net, "forward_features", None)) and callable(getattr(net, "forward_head", None))

    def forward_features(self, x: Tensor) -> Tensor:
        """``N x 3 x H x W`` RGB in [-1, 1] -> the net's features before its embedding head (e.g. ``N x 25088``)."""
        return self.net.forward_features(self.prepare(x))

    def forward_head(self, x: Tensor) -> Tensor:
        """Features from :meth:`forward_features` -> ``N x embed_dim`` (e.g. iResNet's ``fc`` + ``features``)."""
        return self.net.forward_head(x)

    def extra_repr(self) -> str:
        info = self.teacher_info
        return f"format={info.get('format')}, architecture={info.get('architecture')}, embed_dim={self.embed_dim}"
