"""The trainable model: a timm backbone, the class centres beside it, optional extra loss terms.

Composition, not wrapping: ``backbone`` is a plain timm model whose classifier outputs the
embedding, so the artifact people ship is just ``model.backbone``. The margin head (class centres
plus a margin loss) and any distillation terms only exist during training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timmface.losses import MarginLoss

__all__ = ["MarginHead", "FaceModel", "head_extra_loss", "partial_fc_sample", "num_sampled_classes"]


def num_sampled_classes(partial_fc: float, num_classes: int) -> int:
    """How many class centres a Partial FC step uses: a rate (< 1) or a count (>= 1); 0 = all."""
    if partial_fc <= 0:
        return num_classes
    k = int(partial_fc * num_classes) if partial_fc < 1 else int(partial_fc)
    return max(1, min(k, num_classes))


def partial_fc_sample(labels: Tensor, num_classes: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Sorted indices of ``k`` class centres: every class in ``labels`` plus random others.

    As in Partial FC (An et al., 2021; arcface_torch ``PartialFC_V2.sample``): positives get a
    score of 2, everything else a uniform score in [0, 1), and the top ``k`` are kept. When the
    batch holds more than ``k`` classes, all of its classes are kept.

    When ``k`` is at least the number of labels (the usual case: 16,384 sampled centres against a
    micro-batch of hundreds) every positive fits, and scoring the labels directly (repeats write the same
    2.0) gives the same scores, the same random draw and the same indices without ``torch.unique``, whose
    data-dependent size would make the host wait for the device at every step.
    """
    if k >= labels.numel():
        score = torch.rand(num_classes, device=labels.device, generator=generator)
        score[labels] = 2.0
        return torch.topk(score, k, sorted=False).indices.sort().values
    positives = torch.unique(labels)
    if positives.numel() >= k:
        return positives
    score = torch.rand(num_classes, device=labels.device, generator=generator)
    score[positives] = 2.0
    return torch.topk(score, k, sorted=False).indices.sort().values


class MarginHead(nn.Module):
    """Class centres ``C x D`` and a margin loss; optional Partial FC sampling of the centres."""

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        loss: MarginLoss,
        partial_fc: float = 0.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim).normal_(0, init_std))
        self.loss = loss
        self.num_sampled = num_sampled_classes(partial_fc, num_classes)
        self.distill: nn.Module | None = None
        """Set by distillation (:class:`timmface.distill.HeadDistillation`): AdaDistill's centre update before
        the logits, logit KD after them; used when the forward gets the teacher's embeddings."""

    def forward(self, embeddings: Tensor, labels: Tensor, teacher: Tensor | None = None) -> dict[str, Tensor]:
        """embeddings: ``N x D`` (unnormalised); labels: ``N``; teacher: ``N x Dt``, the teacher's embeddings of
        the same images (distillation). Returns ``margin``, ``norms`` and what :attr:`distill` adds."""
        emb = embeddings.float()
        norms = torch.linalg.vector_norm(emb, dim=1)
        hook = self.distill if teacher is not None else None
        out = hook.before_logits(self.weight, emb, teacher, labels) if hook is not None else {}
        weight, index = self.weight, None
        if self.training and self.num_sampled < self.num_classes:
            index = partial_fc_sample(labels, self.num_classes, self.num_sampled)
            weight = weight[index]
            labels = torch.searchsorted(index, labels)
        # cosines in float32: bf16 would put ~0.25 of noise on logits scaled by 64
        with torch.autocast(emb.device.type, enabled=False):
            cosine = F.normalize(emb, dim=1) @ F.normalize(weight.float(), dim=1).T
        out.update(margin=self.loss(cosine, norms, labels), norms=norms.detach())
        if hook is not None:
            out.update(hook.logit_loss(cosine, teacher, index))
        return out


def head_extra_loss(head: nn.Module, out: Mapping[str, Tensor]) -> Tensor | float:
    """The weighted loss terms a head's distillation hook added to its output ``out`` (0 without a hook)."""
    hook = getattr(head, "distill", None)
    return hook.weighted(out) if hook is not None else 0.0


class FaceModel(nn.Module):
    """Backbone + margin head + optional extra terms; what DDP wraps during training.

    ``forward(images)`` in eval mode returns L2-normalised embeddings ``N x D``. In train mode
    ``forward(images, labels, targets)`` returns a dict of loss terms: ``loss`` (the weighted
    total to back-propagate), ``margin``, one entry per extra term, and detached ``norms`` and
    ``embeddings``. ``targets`` carries per-sample extras (e.g. teacher embeddings) to the terms.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: MarginHead | None,
        terms: Mapping[str, nn.Module] | None = None,
        margin_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.terms = nn.ModuleDict(dict(terms or {}))
        self.margin_weight = margin_weight

    def embed(self, images: Tensor) -> Tensor:
        """Unnormalised embeddings ``N x D``."""
        return self.backbone(images)

    def forward(
        self, images: Tensor, labels: Tensor | None = None, targets: Mapping[str, Any] | None = None
    ) -> Tensor | dict[str, Tensor]:
        embeddings = self.backbone(images)
        if not self.training or labels is None:
            return F.normalize(embeddings.float(), dim=1)
        return self.losses(embeddings, labels, targets or {})

    def losses(self, embeddings: Tensor, labels: Tensor, targets: Mapping[str, Any]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        total = embeddings.new_zeros((), dtype=torch.float32)
        if self.head is not None:
            head_out = self.head(embeddings, labels, targets.get("teacher"))
            out.update(head_out)  # margin, norms, and a distillation hook's terms (kd_logit, distill/alpha)
            total = total + self.margin_weight * head_out["margin"] + head_extra_loss(self.head, head_out)
        else:
            out["norms"] = torch.linalg.vector_norm(embeddings.detach().float(), dim=1)
        for name, term in self.terms.items():
            value, weighted = term(embeddings, labels, targets)
            out[name] = value
            total = total + weighted
        out["loss"] = total
        out["embeddings"] = embeddings
        return out
