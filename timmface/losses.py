"""Margin losses for face recognition: CosFace, ArcFace, AdaFace.

Each loss takes the cosine similarities between L2-normalised embeddings and class centres
(``N x C``), the embeddings' norms (``N``) and the labels (``N``), and returns the mean softmax
cross-entropy of the margin-adjusted, scaled logits. :meth:`MarginLoss.margin_logits` exposes the
adjusted logits so a sharded head can run the softmax across ranks; a label of ``-1`` there means
"this row's class is not among these columns" and leaves the row without a margin.

References (formulas, not code):
- CosFace / ArcFace: insightface ``recognition/arcface_torch/losses.py`` ``CombinedMarginLoss``
  with (s, m1, m2, m3) = (64, 1, 0, 0.4) and (64, 1, 0.5, 0).
- AdaFace: mk-minchul/AdaFace ``head.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MarginLoss", "CosFace", "ArcFace", "AdaFace", "LOSSES", "build_loss"]


def _as_float(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 logits lose the margin's precision); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _replace_targets(logits: Tensor, labels: Tensor, margin: Callable[[Tensor], Tensor]) -> Tensor:
    """``logits`` (``N x C``) with each row's logit at its class, ``t`` (``N``), replaced by ``margin(t)``;
    rows labelled ``-1`` (their class is not among these columns) are left as they are.

    Fixed shapes throughout (gather, where, scatter): selecting the labelled rows with ``nonzero`` would
    make the host wait for the device at every step. Rows labelled -1 read column 0 and put it back.
    """
    if logits.shape[1] == 0:  # a shard that sampled no centre
        return logits
    cols = labels.clamp_min(0)[:, None]
    target = logits.gather(1, cols)[:, 0]
    return logits.scatter(1, cols, torch.where(labels >= 0, margin(target), target)[:, None])


class MarginLoss(nn.Module):
    """Base class: ``forward`` = cross-entropy of :meth:`margin_logits`."""

    s: float

    def margin_logits(self, cosine: Tensor, norms: Tensor, labels: Tensor) -> Tensor:
        """Scaled logits ``N x C`` (float32) with the margin applied at ``(i, labels[i])``."""
        raise NotImplementedError

    def forward(self, cosine: Tensor, norms: Tensor, labels: Tensor) -> Tensor:
        """Mean loss over the batch. cosine: ``N x C``; norms: ``N``; labels: ``N`` int64 in ``[0, C)``."""
        return F.cross_entropy(self.margin_logits(cosine, norms, labels), labels)


class CosFace(MarginLoss):
    """Large-margin cosine loss: target logit ``s * (cos θ - m)``."""

    def __init__(self, s: float = 64.0, m: float = 0.4) -> None:
        super().__init__()
        self.s, self.m = s, m

    def margin_logits(self, cosine: Tensor, norms: Tensor, labels: Tensor) -> Tensor:
        logits = _as_float(cosine).clamp(-1.0, 1.0)
        return _replace_targets(logits, labels, lambda target: target - self.m) * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class ArcFace(MarginLoss):
    """Additive angular margin: target logit ``s * cos(θ + m)``.

    By default the gradient is the analytic one of ``cos(θ + m)`` and ``θ + m`` is kept inside
    ``[0, π]`` (past π the cosine would rise again and reward a worse angle). With
    ``straight_through=True`` it reproduces arcface_torch's ``CombinedMarginLoss``, which adds the
    margin under ``no_grad`` so the target logit's gradient is that of the plain cosine, and which
    does not clamp ``θ + m``.
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, straight_through: bool = False) -> None:
        super().__init__()
        self.s, self.m, self.straight_through = s, m, straight_through

    def margin_logits(self, cosine: Tensor, norms: Tensor, labels: Tensor) -> Tensor:
        logits = _as_float(cosine).clamp(-1.0, 1.0)

        def margin(target: Tensor) -> Tensor:
            if self.straight_through:
                with torch.no_grad():
                    shifted = torch.cos(torch.arccos(target) + self.m)
                return target + (shifted - target).detach()
            # clamp away from ±1, where d/dc arccos(c) is infinite
            eps = 1e-7
            theta = torch.arccos(target.clamp(-1.0 + eps, 1.0 - eps))
            return torch.cos((theta + self.m).clamp(0.0, math.pi))

        return _replace_targets(logits, labels, margin) * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, straight_through={self.straight_through}"


class AdaFace(MarginLoss):
    """Quality-adaptive margin (AdaFace, CVPR 2022), following the reference ``head.py``.

    The feature norm is a proxy for image quality. Norms are clipped to ``[0.001, 100]`` and
    detached; running ``batch_mean`` / ``batch_std`` (starting at 20 / 100) move by ``t_alpha``
    towards this batch's mean and *unbiased* std **before** the margin is computed;
    ``scaler = clip(h * (norm - mean) / (std + eps), -1, 1)``. On the target,
    ``θ' = clip(θ - m * scaler, eps, π - eps)`` and the logit is ``cos θ' - (m + m * scaler)``;
    every cosine is first clamped to ``[-1 + eps, 1 - eps]`` with ``eps = 1e-3``; all times ``s``.

    Under DDP with a replicated head, ``sync_stats=True`` computes the batch statistics over the
    global batch (all-reduced), so the running buffers stay identical on every rank and equal
    those of a single-process run with the same global batch.

    Norms may be ``N`` or the reference's ``N x 1``. Only finite norms move the statistics: one NaN or
    infinite embedding (an overflow) would otherwise make them NaN, and every later loss with them, so a
    run skipping non-finite steps could never recover. A batch without two finite norms keeps the std
    (the unbiased std of one sample is undefined), without any it keeps both. All of it on the device:
    no host synchronisation.
    """

    batch_mean: Tensor
    batch_std: Tensor

    def __init__(
        self, m: float = 0.4, h: float = 0.333, s: float = 64.0, t_alpha: float = 0.01, sync_stats: bool = False
    ) -> None:
        super().__init__()
        self.m, self.h, self.s, self.t_alpha = m, h, s, t_alpha
        self.eps = 1e-3
        self.sync_stats = sync_stats
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def _mean_std(self, norms: Tensor, finite: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, unbiased std (n - 1, as the reference's torch.std) and count of the finite norms, in float64;
        over the global batch with ``sync_stats`` under DDP."""
        x = torch.where(finite, norms.double(), 0.0)  # clipped to [0.001, 100]: float64 sums lose nothing that counts
        sums = torch.stack([finite.sum().double(), x.sum(), x.square().sum()])
        if self.sync_stats and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        n, total, total_sq = sums.unbind()
        mean = total / n.clamp_min(1)
        var = (total_sq - total * mean) / (n - 1).clamp_min(1)
        return mean, var.clamp_min(0).sqrt(), n

    @staticmethod
    def _flat_norms(norms: Tensor, rows: int) -> Tensor:
        """``N`` or ``N x 1`` norms as ``N``; any other shape is an error (raised before any state changes)."""
        if norms.ndim == 2 and norms.shape[1] == 1:
            norms = norms[:, 0]
        if norms.shape != (rows,):
            raise ValueError(f"AdaFace: norms must be N or N x 1 for the N = {rows} rows, got {tuple(norms.shape)}")
        return norms

    @torch.no_grad()
    def update_stats(self, norms: Tensor) -> Tensor:
        """Clip the norms, move the running mean/std towards this batch's finite ones; returns the clipped norms
        (``N``; a non-finite norm stays non-finite)."""
        norms = self._flat_norms(norms, norms.shape[0])
        raw = _as_float(norms.detach())
        safe = raw.clamp(0.001, 100.0)
        mean, std, n = self._mean_std(safe, torch.isfinite(raw))
        t = self.t_alpha
        new_mean = (mean * t + (1 - t) * self.batch_mean.double()).to(self.batch_mean.dtype)
        new_std = (std * t + (1 - t) * self.batch_std.double()).to(self.batch_std.dtype)
        self.batch_mean.copy_(torch.where(n >= 1, new_mean, self.batch_mean))
        self.batch_std.copy_(torch.where(n >= 2, new_std, self.batch_std))
        return safe

    def margin_logits(self, cosine: Tensor, norms: Tensor, labels: Tensor) -> Tensor:
        norms = self._flat_norms(norms, cosine.shape[0])
        logits = _as_float(cosine).clamp(-1.0 + self.eps, 1.0 - self.eps)
        safe = self.update_stats(norms)
        scaler = ((safe - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1.0, 1.0)

        def margin(target: Tensor) -> Tensor:
            theta_m = (torch.arccos(target) - self.m * scaler).clamp(self.eps, math.pi - self.eps)
            return torch.cos(theta_m) - (self.m + self.m * scaler)

        return _replace_targets(logits, labels, margin) * self.s

    def extra_repr(self) -> str:
        return f"m={self.m}, h={self.h}, s={self.s}, t_alpha={self.t_alpha}"


LOSSES: dict[str, type[MarginLoss]] = {"cosface": CosFace, "arcface": ArcFace, "adaface": AdaFace}


def build_loss(
    name: str,
    s: float = 64.0,
    m: float | None = None,
    h: float = 0.333,
    t_alpha: float = 0.01,
    straight_through: bool = False,
) -> MarginLoss:
    """A loss by name with the config's hyper-parameters (``m=None`` keeps the published default)."""
    margin = {} if m is None else {"m": m}
    if name == "cosface":
        return CosFace(s=s, **margin)
    if name == "arcface":
        return ArcFace(s=s, straight_through=straight_through, **margin)
    if name == "adaface":
        return AdaFace(h=h, s=s, t_alpha=t_alpha, **margin)
    raise ValueError(f"unknown loss '{name}' (choose from {', '.join(LOSSES)})")
