"""Distillation loss terms: ``forward(embeddings, labels, targets) -> (value, weighted value)``.

Every similarity matrix, softmax and KL here runs in float32 with autocast switched off: under bf16
autocast a matmul of float32 inputs would run in bf16, and the KL of similarities at a temperature of
0.1 comes out ~4% off (``tests/test_distill_methods.py`` checks each term under autocast against float32).

``targets`` (built by the trainer for each micro-step) holds ``teacher`` (``N x Dt``, this rank's rows)
and, with a teacher memory (``distill.memory_size``), ``memory_emb`` (``M x Dt``, normalised),
``memory_labels`` (``M``) and ``memory_slots`` (``N``: where this rank's own rows sit in the memory).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from timmface import distributed as tdist
from timmface.errors import ConfigError

__all__ = [
    "EKD_ANCHORS",
    "EvaluationOrientedDistillation",
    "FeatureDistillation",
    "Pairs",
    "RelationDistillation",
    "ekd_loss",
    "ekd_soft_rank",
    "float32_math",
    "in_batch_pairs",
    "logit_kl",
    "memory_pairs",
    "similarity_kl",
]


def float32_math(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the KD similarities, softmaxes and KLs run in the float32 of their inputs."""
    return torch.autocast(device.type, enabled=False)


def _projection(student_dim: int, teacher_dim: int) -> nn.Linear | None:
    return nn.Linear(student_dim, teacher_dim, bias=False) if student_dim != teacher_dim else None


# --------------------------------------------------------------------------------------------------
# Feature distillation
# --------------------------------------------------------------------------------------------------


class FeatureDistillation(nn.Module):
    """Match the student's L2-normalised embedding to the teacher's.

    ``cosine``: mean over the batch of ``1 - cos(p(s), t)``; ``mse``: ``F.mse_loss`` over the
    elements of the two normalised vectors (for unit vectors that is ``(2 - 2 cos) / D``).
    ``p`` is a bias-free linear map from the student's to the teacher's size when they differ.
    """

    def __init__(self, student_dim: int, teacher_dim: int, loss: str = "cosine", weight: float = 1.0) -> None:
        super().__init__()
        if loss not in ("cosine", "mse"):
            raise ConfigError(f"distill.feature_loss: '{loss}' is not one of cosine, mse")
        self.loss, self.weight = loss, weight
        self.proj = _projection(student_dim, teacher_dim)

    def forward(self, embeddings: Tensor, labels: Tensor, targets: dict[str, Any]) -> tuple[Tensor, Tensor]:
        with float32_math(embeddings.device):
            s = embeddings.float()
            if self.proj is not None:
                s = self.proj(s)
            s = F.normalize(s, dim=1)
            t = F.normalize(targets["teacher"].float(), dim=1)
            if self.loss == "cosine":
                value = (1.0 - (s * t).sum(1)).mean()
            else:
                value = F.mse_loss(s, t)
        return value, self.weight * value


# --------------------------------------------------------------------------------------------------
# Pairs for the relation terms: in-batch (student-student vs teacher-teacher) or against the memory
# --------------------------------------------------------------------------------------------------


@dataclass
class Pairs:
    """Similarities of pairs ``(i, j)``: rows are samples, columns their partners.

    ``sim_s`` / ``sim_t``: ``R x M`` float32, the student's (with gradient) and the teacher's;
    ``include``: ``R x M`` bool, the pairs that count (self-pairs and duplicates left out);
    ``same``: ``R x M`` bool, same identity; ``shared``: every rank computed exactly these pairs (a single
    process, or the whole gathered batch on every rank), so statistics of them need no averaging over ranks.
    """

    sim_s: Tensor
    sim_t: Tensor
    include: Tensor
    same: Tensor
    shared: bool


def _gather_columns(s: Tensor, t: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, int] | None:
    """Every rank's ``s`` (with gradient), ``t`` and ``labels`` in rank order, and this rank's row offset;
    ``None`` outside DDP or when the ranks' batches differ in size (records skipped): then use this rank's."""
    if not tdist.is_distributed():
        return None
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros(1, dtype=torch.long, device=s.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([s.shape[0]], device=s.device))
    if len({int(x) for x in sizes}) != 1:
        return None
    s_all = torch.cat(all_gather(s), dim=0)  # differentiable: each rank's gradient flows back to its rows
    t_all = torch.cat(_gather_no_grad(t), dim=0)
    labels_all = torch.cat(_gather_no_grad(labels), dim=0)
    return s_all, t_all, labels_all, dist.get_rank() * s.shape[0]


def _gather_no_grad(x: Tensor) -> list[Tensor]:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return out


def in_batch_pairs(
    s: Tensor, t: Tensor, labels: Tensor, gather: bool = False, all_rows: bool = False, once: bool = False
) -> Pairs:
    """Pairs within the batch: ``s_i . s_j`` against ``t_i . t_j`` (unit ``s``, ``t``: ``N x D`` / ``N x Dt``).

    ``gather`` (under DDP): the columns span every rank's embeddings; ``all_rows`` then makes the rows the
    whole gathered batch too (every rank computes the same pairs). ``once``: each unordered pair once
    (``j > i``, the upper triangle); else every ``j != i``.
    """
    rows_s, rows_t, rows_l, cols_s, cols_t, cols_l, offset = s, t, labels, s, t, labels, 0
    gathered = _gather_columns(s, t, labels) if gather else None
    if gathered is not None:
        cols_s, cols_t, cols_l, offset = gathered
        if all_rows:
            rows_s, rows_t, rows_l, offset = cols_s, cols_t, cols_l, 0
    sim_s, sim_t = rows_s @ cols_s.T, rows_t @ cols_t.T
    i = torch.arange(rows_s.shape[0], device=s.device)[:, None] + offset
    j = torch.arange(cols_s.shape[0], device=s.device)[None, :]
    include = j > i if once else j != i
    same = rows_l[:, None] == cols_l[None, :]
    shared = not tdist.is_distributed() or (gathered is not None and all_rows)
    return Pairs(sim_s, sim_t, include, same, shared)


def memory_pairs(s: Tensor, t: Tensor, labels: Tensor, targets: dict[str, Any]) -> Pairs:
    """Pairs with the teacher memory: ``s_i . m_j`` against ``t_i . m_j`` (``s`` in the teacher's space).

    Row ``i``'s own slot (its teacher embedding, pushed before this step's loss) is left out."""
    mem, mem_labels, slots = targets["memory_emb"], targets["memory_labels"], targets["memory_slots"]
    mem = mem.float()
    sim_s, sim_t = s @ mem.T, t @ mem.T
    include = torch.ones_like(sim_s, dtype=torch.bool)
    include[torch.arange(s.shape[0], device=s.device), slots.to(s.device)] = False
    same = labels[:, None].to(mem_labels.device) == mem_labels[None, :]
    return Pairs(sim_s, sim_t, include, same.to(s.device), shared=not tdist.is_distributed())


def _needs_memory(targets: dict[str, Any]) -> None:
    if "memory_emb" not in targets:
        raise RuntimeError("a memory relation term needs targets['memory_emb'] (distill.memory_size > 0)")


# --------------------------------------------------------------------------------------------------
# Relation distillation: MSE or KL over similarity rows
# --------------------------------------------------------------------------------------------------


def similarity_kl(student_sim: Tensor, teacher_sim: Tensor, temperature: float, exclude: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher / T) || softmax(student / T)) over the columns not in
    ``exclude``, times T^2; rows without a column left are skipped."""
    keep = ~exclude.all(1)
    student_sim, teacher_sim, exclude = student_sim[keep], teacher_sim[keep], exclude[keep]
    if student_sim.shape[0] == 0:
        return student_sim.sum() * 0.0
    neg = torch.finfo(student_sim.dtype).min
    log_p_s = F.log_softmax((student_sim / temperature).masked_fill(exclude, neg), dim=1)
    log_p_t = F.log_softmax((teacher_sim / temperature).masked_fill(exclude, neg), dim=1)
    p_t = log_p_t.exp()
    kl = (p_t * (log_p_t - log_p_s)).masked_fill(exclude, 0.0).sum(1)
    return kl.mean() * temperature**2


class RelationDistillation(nn.Module):
    """Match the student's similarity rows to the teacher's, by MSE or row-wise KL at a temperature.

    In-batch (``memory=False``): the student's ``s_i . s_j`` against the teacher's ``t_i . t_j`` over the
    batch (``j != i``); with ``gather`` under DDP the columns span every rank's embeddings (the student's
    gathered with their gradient). Memory (``memory=True``): ``p(s_i) . m_j`` against ``t_i . m_j`` over
    the teacher memory (``p`` a learned map to the teacher's size when the sizes differ).
    ``mse``: mean squared difference over the included pairs; ``kl``: :func:`similarity_kl`.
    """

    def __init__(
        self,
        loss: str = "mse",
        weight: float = 1.0,
        temperature: float = 0.1,
        gather: bool = False,
        memory: bool = False,
        student_dim: int = 0,
        teacher_dim: int = 0,
    ) -> None:
        super().__init__()
        if loss not in ("mse", "kl"):
            raise ConfigError(f"distill.relation_loss: '{loss}' is not one of mse, kl")
        self.loss, self.weight, self.temperature, self.gather = loss, weight, temperature, gather
        self.memory = memory
        self.proj = _projection(student_dim, teacher_dim) if memory else None

    def pairs(self, embeddings: Tensor, labels: Tensor, targets: dict[str, Any], **kw: bool) -> Pairs:
        s = embeddings.float()
        t = F.normalize(targets["teacher"].float(), dim=1)
        if not self.memory:
            return in_batch_pairs(F.normalize(s, dim=1), t, labels, gather=self.gather, **kw)
        _needs_memory(targets)
        if self.proj is not None:
            s = self.proj(s)
        return memory_pairs(F.normalize(s, dim=1), t, labels, targets)

    def forward(self, embeddings: Tensor, labels: Tensor, targets: dict[str, Any]) -> tuple[Tensor, Tensor]:
        with float32_math(embeddings.device):
            p = self.pairs(embeddings, labels, targets)
            if self.loss == "mse":
                value = (p.sim_s - p.sim_t).square().masked_fill(~p.include, 0.0).sum() / p.include.sum().clamp_min(1)
            else:
                value = similarity_kl(p.sim_s, p.sim_t, self.temperature, ~p.include)
        return value, self.weight * value


# --------------------------------------------------------------------------------------------------
# Evaluation-oriented KD (EKD; Huang et al., CVPR 2022; Tencent/TFace recognition/tasks/ekd)
# --------------------------------------------------------------------------------------------------

EKD_ANCHORS = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
"""The thresholds at FPR = 1/a: the similarity of the negative pair at rank ``L // a`` (``L`` negatives,
sorted by similarity, highest first), as TFace's ``EKD.anchor``. A batch with fewer than ``a`` negatives
takes its highest negative similarity for that FPR."""


def ekd_soft_rank(sims: Tensor, anchors: Tensor, temperature: float) -> Tensor:
    """``P`` similarities -> ``P`` soft counts of the thresholds each one exceeds:
    ``sum_k sigmoid((x - a_k) / T)``, the argument clamped to [-50, 50] (as TFace)."""
    return torch.sigmoid(((sims[:, None] - anchors[None, :]) / temperature).clamp(-50.0, 50.0)).sum(1)


def _rank_mse(s: Tensor, t: Tensor, s_anchor: Tensor, t_anchor: Tensor, temperature: float) -> Tensor:
    if s.numel() == 0:
        return s.sum() * 0.0  # keeps the graph (DDP wants every parameter to get a gradient)
    return F.mse_loss(ekd_soft_rank(s, s_anchor, temperature), ekd_soft_rank(t, t_anchor, temperature))


@torch.no_grad()
def _thresholds(neg: Tensor, anchors: tuple[int, ...]) -> Tensor:
    ordered = neg.sort(descending=True).values
    return ordered[torch.tensor([len(ordered) // a for a in anchors], device=neg.device)]


def ekd_loss(
    sim_s: Tensor,
    sim_t: Tensor,
    positive: Tensor,
    s_anchor: Tensor,
    t_anchor: Tensor,
    temperature: float = 0.01,
    topk: int = 2000,
    momentum: float = 0.01,
    anchors: tuple[int, ...] = EKD_ANCHORS,
    pos_weight: float = 0.02,
    neg_weight: float = 0.01,
    average_over_ranks: bool = False,
) -> Tensor:
    """EKD's loss over ``P`` pairs (similarities ``sim_s`` with gradient, ``sim_t``; ``positive``: same identity).

    1. Thresholds: the student's and the teacher's negative similarities are each sorted (highest first)
       and read at ranks ``L // a`` (:data:`EKD_ANCHORS`, FPR 1e-1 .. 1e-6); the running thresholds
       ``s_anchor`` / ``t_anchor`` (``len(anchors)``, updated in place) move there by
       ``a <- momentum * new + (1 - momentum) * a``, from zero, before the loss (TFace). With
       ``average_over_ranks`` (DDP, each rank seeing different pairs) the new thresholds are first averaged
       over the ranks, so every rank keeps the same running thresholds.
    2. Critical pairs: every positive pair, and the ``topk`` negatives the *student* finds most similar
       (the ones that raise its FPR); the teacher's similarities of the same pairs.
    3. Rank loss: for each pair the soft count of thresholds it exceeds, the student's against its own
       thresholds and the teacher's against the teacher's (:func:`ekd_soft_rank`); MSE between the two.
       Only the rank relative to each model's own operating points is matched, not the raw similarity.
    4. ``pos_weight * MSE(positives) + neg_weight * MSE(hard negatives)`` (TFace: 0.02 and 0.01).
    An empty part (no positive pair in the batch, say) contributes 0.
    """
    neg = ~positive
    neg_s, neg_t = sim_s[neg], sim_t[neg]
    with torch.no_grad():
        has = neg_s.numel() > 0
        if has:
            new = torch.stack([_thresholds(neg_s.detach(), anchors), _thresholds(neg_t, anchors)])
        else:
            new = torch.zeros(2, len(anchors), device=s_anchor.device)
        if average_over_ranks and tdist.is_distributed():  # every rank joins, with or without negatives
            packed = torch.cat([new.flatten() * float(has), new.new_tensor([float(has)])])
            dist.all_reduce(packed)
            has = bool(packed[-1] > 0)
            new = packed[:-1].view(2, -1) / packed[-1].clamp_min(1)
        if has:
            s_anchor.copy_(momentum * new[0].to(s_anchor) + (1 - momentum) * s_anchor)
            t_anchor.copy_(momentum * new[1].to(t_anchor) + (1 - momentum) * t_anchor)
    sa, ta = s_anchor.detach().clone(), t_anchor.detach().clone()
    pos_loss = _rank_mse(sim_s[positive], sim_t[positive], sa, ta, temperature)
    hard = neg_s.detach().topk(min(topk, neg_s.numel())).indices
    neg_loss = _rank_mse(neg_s[hard], neg_t[hard], sa, ta, temperature)
    return pos_weight * pos_loss + neg_weight * neg_loss


class EvaluationOrientedDistillation(nn.Module):
    """EKD (Huang et al., "Evaluation-oriented Knowledge Distillation for Deep Face Recognition", CVPR 2022):
    :func:`ekd_loss` over the batch's pairs (each unordered pair once; ``gather``: the whole batch of every
    rank, computed alike on each) or over the pairs with the teacher memory (``memory``).

    The running thresholds are buffers, saved with the run and identical on every rank.
    """

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 0.01,
        topk: int = 2000,
        gather: bool = False,
        memory: bool = False,
        student_dim: int = 0,
        teacher_dim: int = 0,
        momentum: float = 0.01,
    ) -> None:
        super().__init__()
        self.weight, self.temperature, self.topk, self.momentum = weight, temperature, topk, momentum
        self.gather, self.memory = gather, memory
        self.proj = _projection(student_dim, teacher_dim) if memory else None
        self.register_buffer("s_anchor", torch.zeros(len(EKD_ANCHORS)))
        self.register_buffer("t_anchor", torch.zeros(len(EKD_ANCHORS)))

    def forward(self, embeddings: Tensor, labels: Tensor, targets: dict[str, Any]) -> tuple[Tensor, Tensor]:
        with float32_math(embeddings.device):
            s = embeddings.float()
            t = F.normalize(targets["teacher"].float(), dim=1)
            if self.memory:
                _needs_memory(targets)
                if self.proj is not None:
                    s = self.proj(s)
                p = memory_pairs(F.normalize(s, dim=1), t, labels, targets)
            else:
                p = in_batch_pairs(F.normalize(s, dim=1), t, labels, gather=self.gather, all_rows=True, once=True)
            value = ekd_loss(
                p.sim_s[p.include],
                p.sim_t[p.include],
                p.same[p.include],
                self.s_anchor,
                self.t_anchor,
                temperature=self.temperature,
                topk=self.topk,
                momentum=self.momentum,
                average_over_ranks=not p.shared,
            )
        return value, self.weight * value


# --------------------------------------------------------------------------------------------------
# Logit KD over the class centres (used by the margin heads)
# --------------------------------------------------------------------------------------------------


class _LogitKL(torch.autograd.Function):
    """``T^2`` times the mean over rows of KL(softmax(t / T) || softmax(s / T)), the softmax running over
    columns split across the ``world`` ranks of ``group`` (each holds ``N x k_r`` of the same ``N`` rows;
    ``world=1``: all columns here). The result is the same on every rank; the backward gives this rank's
    columns their exact gradient ``T (p_s - p_t) / N`` (as :class:`~timmface.partial_fc._DistributedSoftmaxCE`)."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temperature: float, group: Any, world: int) -> Tensor:  # type: ignore[override]
        zs, zt = student.float() / temperature, teacher.float() / temperature
        n, k = zs.shape
        if k > 0:
            row_max = torch.stack([zs.max(1).values, zt.max(1).values])
        else:
            row_max = zs.new_full((2, n), float("-inf"))
        if world > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        es, et = (zs - row_max[0, :, None]).exp(), (zt - row_max[1, :, None]).exp()
        sums = torch.stack([es.sum(1), et.sum(1)])
        if world > 1:
            dist.all_reduce(sums, group=group)
        log_ps = zs - (row_max[0] + sums[0].log())[:, None]
        log_pt = zt - (row_max[1] + sums[1].log())[:, None]
        p_t = log_pt.exp()
        kl = (p_t * (log_pt - log_ps)).sum(1)
        if world > 1:
            dist.all_reduce(kl, group=group)
        ctx.save_for_backward(log_ps.exp() - p_t)
        ctx.temperature = temperature
        return kl.mean() * temperature**2 if n else kl.sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        (diff,) = ctx.saved_tensors
        return diff * (grad * ctx.temperature / max(diff.shape[0], 1)), None, None, None, None


def logit_kl(student: Tensor, teacher: Tensor, temperature: float, group: Any = None, world_size: int = 1) -> Tensor:
    """Logit KD: ``T^2 * mean_i KL(softmax(teacher_i / T) || softmax(student_i / T))`` (float32).

    student: ``N x k`` logits of the student's embeddings against its class centres (with gradient);
    teacher: ``N x k`` logits of the teacher's embeddings against the teacher's centres of the same classes.
    Under the sharded head each rank passes its own columns, ``group`` and its ``world_size``; the softmax
    spans the columns of every rank. With ``world_size=1`` nothing is communicated.
    """
    with float32_math(student.device):
        return _LogitKL.apply(student, teacher.detach(), temperature, group, world_size)
