"""Class centres from the teacher: AdaDistill's per-sample update, the EMA of batch means, and the margin
head's distillation hook (AdaDistill before the logits, logit KD after them)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from timmface import distributed as tdist
from timmface.distill.terms import float32_math, logit_kl
from timmface.errors import ConfigError
from timmface.progress import CountProgress

__all__ = ["HeadDistillation", "adadistill_update_", "compute_teacher_centres", "ema_update_", "occurrence_index"]


@torch.no_grad()
def compute_teacher_centres(
    dataset: Any,
    num_classes: int,
    teacher: nn.Module | None = None,
    cache: Any = None,
    batch_size: int = 256,
    device: torch.device | None = None,
    image_size: int = 112,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> Tensor:
    """``C x D`` unit vectors: per identity, the normalised mean of its images' normalised teacher
    embeddings (original views). From ``cache`` when given (no forward), else by running ``teacher`` over
    the dataset once (at real scale a pass as long as ``timmface embed``'s; ``progress`` shows it, as plain
    lines off a terminal).
    Under DDP each rank takes every ``world_size``-th record and the sums are all-reduced. A class without
    a readable image gets a random unit vector drawn from a generator seeded by its index (the same on
    every rank)."""
    import numpy as np

    labels_all = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long)
    indices = torch.arange(rank, len(labels_all), world_size)
    if cache is not None:
        dim = int(cache.dim)
        device = torch.device("cpu") if device is None else device
        sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        missing = set(cache.missing().tolist())
        for start in range(0, len(indices), 4096):
            idx = indices[start : start + 4096]
            if missing:
                idx = idx[torch.tensor([int(i) not in missing for i in idx], dtype=torch.bool)]
            emb = cache.lookup(idx.numpy(), torch.zeros(len(idx), dtype=torch.bool)).to(device)
            _accumulate(sums, counts, F.normalize(emb.float(), dim=1), labels_all[idx].to(device))
    else:
        if teacher is None:
            raise ConfigError("teacher class centres need a teacher (distill.teacher) or a cache (distill.cache)")
        from torch.utils.data import DataLoader, Subset

        from timmface.data.batch import normalize_on_device
        from timmface.data.loader import SampleDataset, collate

        device = device or torch.device("cpu")
        samples = SampleDataset(dataset, None, image_size)
        items = [(int(i), 0, False) for i in indices]
        loader = DataLoader(Subset(samples, items), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
        sums = counts = None
        bar = CountProgress("teacher class centres", len(items), enabled=progress)
        for batch in loader:
            bar.update(len(batch.labels))
            if len(batch.labels) == 0:
                continue
            emb = teacher(normalize_on_device(batch.images.to(device), None)).float()
            if sums is None:
                sums = torch.zeros(num_classes, emb.shape[1], dtype=torch.float64, device=emb.device)
                counts = torch.zeros(num_classes, dtype=torch.float64, device=emb.device)
            _accumulate(sums, counts, F.normalize(emb, dim=1), batch.labels.to(emb.device))
        bar.close()
        assert sums is not None and counts is not None, "empty dataset"
    if tdist.is_distributed():
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    empty = torch.nonzero(counts == 0, as_tuple=True)[0]
    if empty.numel():
        warnings.warn(
            f"teacher class centres: {empty.numel()} class(es) have no readable image (first: {int(empty[0])}); "
            "their centres are random",
            stacklevel=2,
        )
        for c in empty.tolist():
            g = torch.Generator().manual_seed(c)
            sums[c] = torch.randn(sums.shape[1], generator=g, dtype=torch.float64).to(sums.device)
    return F.normalize((sums / counts.clamp_min(1)[:, None]).float(), dim=1)


def _accumulate(sums: Tensor, counts: Tensor, emb: Tensor, labels: Tensor) -> None:
    sums.index_add_(0, labels, emb.double())
    counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))


def occurrence_index(labels: Tensor) -> Tensor:
    """``N`` -> ``N``: how many earlier positions of ``labels`` hold the same value (0 at a label's first)."""
    n = labels.numel()
    if n == 0:
        return labels.new_zeros(0)
    order = torch.sort(labels, stable=True).indices  # grouped by label, batch order inside a group
    ordered = labels[order]
    pos = torch.arange(n, device=labels.device)
    starts = torch.ones(n, dtype=torch.bool, device=labels.device)
    starts[1:] = ordered[1:] != ordered[:-1]
    group_start = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=0).values
    out = torch.empty_like(pos)
    out[order] = pos - group_start
    return out


@torch.no_grad()
def adadistill_update_(centres: Tensor, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
    """AdaDistill's class-centre update (Boutros et al., ECCV 2024; fdbtrs/AdaDistill ``utils/losses.py``,
    ``AdaptiveACosFace`` / ``AdaptiveAArcFace``, the adaptive-weighted alpha), in place, in float32.

    For each sample ``i``, **in batch order**, with ``s``, ``t`` its L2-normalised student and teacher
    embeddings and ``w`` the current (unnormalised) centre row of its class ``y_i``::

        alpha_i = clamp(clamp(cos(s, t), -1, 1) * clamp(cos(w, t), 1e-6, 1), 1e-6, 1)
        w      <- alpha_i * w + (1 - alpha_i) * t

    Several samples of one class in a batch are applied one after the other, each on the row its
    predecessor left (the reference assigns them all at once from the old row, so one of them wins
    arbitrarily). A student that agrees with the teacher (alpha near 1) keeps the centre; early in training
    alpha is small and the centre moves to the teacher's embedding.

    Args:
        centres: ``C x D`` class centres (a head's weight), updated in place in their own dtype.
        student: ``N x D`` student embeddings (any scale; detached here).
        teacher: ``N x D`` teacher embeddings (any scale).
        labels: ``N`` int64 row indices into ``centres``.
    Returns:
        ``N`` float32: each sample's alpha.
    """
    n = labels.numel()
    alpha = torch.empty(n, dtype=torch.float32, device=centres.device)
    if n == 0:
        return alpha
    with float32_math(centres.device):
        s = F.normalize(student.detach().float().to(centres.device), dim=1)
        t = F.normalize(teacher.detach().float().to(centres.device), dim=1)
        labels = labels.to(centres.device)
        cos_st = (s * t).sum(1).clamp(-1.0, 1.0)
        occurrence = occurrence_index(labels)
        for k in range(int(occurrence.max()) + 1):  # round k: the k-th sample of each class, no repeats inside
            idx = torch.nonzero(occurrence == k, as_tuple=True)[0]
            rows = labels[idx]
            w = centres[rows].float()
            lam = F.cosine_similarity(w, t[idx], dim=1).clamp(1e-6, 1.0)
            a = (cos_st[idx] * lam).clamp(1e-6, 1.0)
            centres.index_copy_(0, rows, (a[:, None] * w + (1.0 - a[:, None]) * t[idx]).to(centres.dtype))
            alpha[idx] = a
    return alpha


@torch.no_grad()
def ema_update_(centres: Tensor, teacher: Tensor, labels: Tensor, momentum: float) -> None:
    """``distill.centres=ema``: for every class ``c`` in the batch,
    ``w_c <- normalise(momentum * normalise(w_c) + (1 - momentum) * normalise(mean of its normalised teacher
    embeddings))``, in place (rows of ``centres`` indexed by ``labels``). A fixed momentum on batch means,
    applied after the optimiser step; not AdaDistill (see :func:`adadistill_update_`)."""
    if labels.numel() == 0:
        return
    with float32_math(centres.device):
        emb = F.normalize(teacher.float().to(centres.device), dim=1)
        labels = labels.to(centres.device)
        classes, inverse = torch.unique(labels, return_inverse=True)
        sums = torch.zeros(len(classes), emb.shape[1], device=emb.device).index_add_(0, inverse, emb)
        means = F.normalize(sums, dim=1)
        rows = F.normalize(centres[classes].float(), dim=1)
        centres[classes] = F.normalize(momentum * rows + (1 - momentum) * means, dim=1).to(centres.dtype)


class HeadDistillation(nn.Module):
    """What a margin head does with the teacher's embeddings of its batch (set as ``head.distill``).

    - ``adadistill``: :func:`adadistill_update_` on the centre rows of the batch's classes, under
      ``no_grad``, before the head computes its logits; the rows stay trainable parameters. The head passes
      the *global* batch (every rank's rows in rank order, i.e. the global batch order) and the class range
      its rows hold, so a replicated head changes alike on every rank and a sharded one changes each row on
      the rank that owns it, from the same samples in the same order: any world size gives the same centres.
    - ``logit_weight > 0``: logit KD (Hinton et al. 2015) on the margin head's logits without the margin,
      ``logit_scale * cos``: the student's cosines to its centres, the teacher's cosines to
      ``teacher_centres`` (each class's mean teacher embedding; this head's rows), over the same classes (all,
      or the ones Partial FC sampled this step); ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` at
      ``T = logit_temperature`` (:func:`~timmface.distill.terms.logit_kl`).

    ``teacher_centres`` is a non-persistent buffer: it is not part of the checkpoint (the run folder keeps
    it once, ``teacher_centres.safetensors``).
    """

    def __init__(
        self,
        adadistill: bool = False,
        logit_weight: float = 0.0,
        logit_temperature: float = 4.0,
        logit_scale: float = 64.0,
        teacher_centres: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.adadistill = adadistill
        self.logit_weight, self.logit_temperature, self.logit_scale = logit_weight, logit_temperature, logit_scale
        if logit_weight > 0 and teacher_centres is None:
            raise ValueError("logit KD needs the teacher's class centres")
        self.register_buffer(
            "teacher_centres", None if teacher_centres is None else teacher_centres.float(), persistent=False
        )

    def before_logits(
        self,
        weight: Tensor,
        embeddings: Tensor,
        teacher: Tensor,
        labels: Tensor,
        start: int = 0,
        gathered: bool = False,
        group: Any = None,
    ) -> dict[str, Tensor]:
        """AdaDistill's update of ``weight`` (rows ``start .. start + len(weight)`` of all classes).

        ``gathered``: the inputs already are the global batch and the rows are this rank's shard (the sharded
        head); otherwise they are this rank's and are all-gathered here under DDP (a replicated head).
        Returns ``{"distill/alpha": mean alpha over the global batch}``; ``{}`` without AdaDistill.
        """
        if not self.adadistill:
            return {}
        with torch.no_grad():
            if not gathered and tdist.is_distributed():
                embeddings, teacher, labels = (
                    tdist.all_gather_concat(x.detach()) for x in (embeddings, teacher, labels)
                )
            mine = (labels >= start) & (labels < start + weight.shape[0])
            alpha = adadistill_update_(weight, embeddings[mine], teacher[mine], labels[mine] - start)
            stats = torch.stack([alpha.sum(), alpha.new_tensor(float(alpha.numel()))])
            if gathered and tdist.is_distributed():
                torch.distributed.all_reduce(stats, group=group)
        return {"distill/alpha": stats[0] / stats[1].clamp_min(1)}

    def logit_loss(
        self, cosine: Tensor, teacher: Tensor, index: Tensor | None = None, group: Any = None, world_size: int = 1
    ) -> dict[str, Tensor]:
        """``{"kd_logit": value}`` for the student's cosines ``N x k`` (float32, with gradient) to the centres
        ``index`` (``None``: all of this head's rows) and the teacher's embeddings ``N x Dt`` of the same rows."""
        if self.logit_weight <= 0:
            return {}
        with float32_math(cosine.device):
            centres = self.teacher_centres if index is None else self.teacher_centres[index]
            t = F.normalize(teacher.detach().float().to(cosine.device), dim=1)
            teacher_cos = t @ F.normalize(centres, dim=1).T
            z_s, z_t = self.logit_scale * cosine.float(), self.logit_scale * teacher_cos
            return {"kd_logit": logit_kl(z_s, z_t, self.logit_temperature, group, world_size)}

    def weighted(self, out: dict[str, Tensor]) -> Tensor | float:
        """The weighted terms this hook added to a head's output (0 when none)."""
        return self.logit_weight * out["kd_logit"] if "kd_logit" in out else 0.0

    def extra_repr(self) -> str:
        return (
            f"adadistill={self.adadistill}, logit_weight={self.logit_weight}, T={self.logit_temperature}, "
            f"scale={self.logit_scale}"
        )
