"""Partial FC with the class centres sharded across DDP ranks (model parallelism for the margin head).

Rank ``r`` of ``W`` holds the contiguous centres ``[start_r, start_r + C_r)`` with ``C_r = C // W``
(+1 for the first ``C % W`` ranks), as arcface_torch's ``PartialFC_V2`` does (An et al., "Killing
Two Birds with One Stone", 2022). A step:

1. all-gather the embeddings (with gradient: the backward sums every rank's gradient and returns
   this rank's rows) and the labels, so each rank scores the *global* batch ``N x D``;
2. map labels to this shard's columns (``-1`` = the class lives elsewhere) and, with Partial FC,
   keep this shard's positives plus random negatives: ``head.partial_fc`` (a rate, or a count)
   is split across shards in proportion to their sizes;
3. margin logits ``N x k_r`` from :meth:`MarginLoss.margin_logits` (CosFace, ArcFace, AdaFace);
4. a softmax cross-entropy whose max and sum-exp are all-reduced and whose positive logit
   comes from the one rank that holds it.

The loss is the mean over the global batch and is identical on every rank; its gradients are
exact: w.r.t. this rank's centres, and w.r.t. this rank's embeddings. Under DDP, which *averages*
the backbone's gradients over ranks, the caller multiplies the embedding gradient by ``W``
(:func:`scale_grad`), as arcface_torch's ``AllGatherFunc`` does internally.

With a world size of 1 every collective is skipped and the head equals :class:`~timmface.model.MarginHead`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from timmface.losses import AdaFace, MarginLoss
from timmface.model import num_sampled_classes, partial_fc_sample

__all__ = [
    "ShardedMarginHead",
    "shard_range",
    "shard_sample_counts",
    "init_centre_rows",
    "all_gather_with_grad",
    "distributed_cross_entropy",
    "scale_grad",
    "clip_grad_norm_sharded",
]

Group = dist.ProcessGroup | None


def _world(group: Group) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, count)`` of rank ``rank``'s contiguous centres; the first ``C % W`` ranks get one more."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def shard_sample_counts(num_sampled: int, num_classes: int, world_size: int) -> list[int]:
    """Split ``num_sampled`` centres over the shards in proportion to their sizes (sums to ``num_sampled``).

    Rank ``r`` gets ``round(k * end_r / C) - round(k * start_r / C)``: the cumulative split rounded,
    so the shares differ from ``k * C_r / C`` by less than one and add up exactly.
    """
    counts = []
    for r in range(world_size):
        start, count = shard_range(num_classes, r, world_size)
        lo = math.floor(num_sampled * start / num_classes + 0.5)
        hi = math.floor(num_sampled * (start + count) / num_classes + 0.5)
        counts.append(hi - lo)
    return counts


def init_centre_rows(start: int, count: int, embed_dim: int, std: float, seed: int, block: int = 4096) -> Tensor:
    """Rows ``[start, start + count)`` of a ``C x D`` normal(0, std) matrix that does not depend on the sharding.

    Each block of ``block`` rows is drawn from its own generator seeded by ``(seed, block index)``, so
    a rank draws only the blocks it overlaps and every world size starts from the same centres.
    """
    out = torch.empty(count, embed_dim)
    first, last = start // block, (start + count - 1) // block
    for b in range(first, last + 1) if count > 0 else ():
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        rows = torch.empty(block, embed_dim).normal_(0.0, std, generator=g)
        lo, hi = max(start, b * block), min(start + count, (b + 1) * block)
        out[lo - start : hi - start] = rows[lo - b * block : hi - b * block]
    return out


# --------------------------------------------------------------------------------------------------
# Collectives with the gradients the sharded loss needs
# --------------------------------------------------------------------------------------------------


def _gather_sizes(n: int, device: torch.device, group: Group) -> list[int]:
    t = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(t) for _ in range(_world(group)[1])]
    dist.all_gather(sizes, t, group=group)
    return [int(s.item()) for s in sizes]


def _gather_rows(x: Tensor, sizes: list[int], group: Group) -> Tensor:
    """Concatenate every rank's ``n_r x ...`` rows in rank order (ranks may hold different counts)."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _AllGatherRows(torch.autograd.Function):
    """Forward: all ranks' rows in rank order. Backward: the sum of the gradients every rank computed
    for the gathered matrix, sliced to this rank's rows (each rank only back-propagates through its
    own centres, so the full gradient of a row is the sum over ranks)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int, group: Group) -> Tensor:  # type: ignore[override]
        ctx.offset, ctx.n, ctx.group = sum(sizes[:rank]), x.shape[0], group
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.offset : ctx.offset + ctx.n], None, None, None


def all_gather_with_grad(x: Tensor, group: Group = None) -> tuple[Tensor, list[int]]:
    """``n_r x D`` on each rank -> ``(N x D, [n_0, ..., n_{W-1}])``; differentiable (see :class:`_AllGatherRows`)."""
    rank, world = _world(group)
    if world == 1:
        return x, [x.shape[0]]
    sizes = _gather_sizes(x.shape[0], x.device, group)
    return _AllGatherRows.apply(x, sizes, rank, group), sizes


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity whose backward multiplies the gradient by ``scale``.

    DDP divides the backbone's summed gradients by ``W``; the sharded loss is already the global
    mean, so its embedding gradient is multiplied by ``W`` first (arcface_torch does the same inside
    its ``AllGatherFunc.backward``).
    """
    return x if scale == 1 else _ScaleGrad.apply(x, scale)


class _DistributedSoftmaxCE(torch.autograd.Function):
    """Mean softmax cross-entropy over columns split across ranks (arcface_torch ``DistCrossEntropyFunc``).

    Keeps one ``N x k`` float32 matrix (the probabilities) for the backward, not the autograd chain
    of max / exp / sum / log: at 2M classes that matrix is the largest tensor of a step.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, group: Group) -> Tensor:  # type: ignore[override]
        n, k = logits.shape
        world = _world(group)[1]
        if k > 0:
            row_max = logits.max(dim=1).values
        else:  # this shard sampled no centre: it contributes nothing to the softmax
            row_max = logits.new_full((n,), -math.inf)
        if world > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        probs = (logits - row_max[:, None]).exp_()
        rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
        # one all-reduce for both: row 0 the sum of exp, row 1 the positive's shifted logit (held by one rank)
        stats = logits.new_zeros(2, n)
        stats[0] = probs.sum(dim=1)
        stats[1, rows] = logits[rows, labels[rows]] - row_max[rows]
        if world > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        probs.div_(stats[0][:, None])
        ctx.save_for_backward(probs, rows, labels[rows])
        return (stats[0].log() - stats[1]).mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        probs, rows, cols = ctx.saved_tensors
        # d(mean CE)/d logits = (softmax - one_hot) / N; only the holder of a row's positive subtracts 1.
        # In place, as arcface_torch does: the probabilities are the largest tensor of the step and are
        # needed by this one backward only (no retain_graph in training).
        probs[rows, cols] -= 1.0
        return probs.mul_(grad / max(probs.shape[0], 1)), None, None


def distributed_cross_entropy(logits: Tensor, labels: Tensor, group: Group = None) -> Tensor:
    """Mean over the ``N`` rows of ``-log softmax`` at each row's positive, the softmax running over
    the columns of every rank. logits: ``N x k_r`` float32 (same ``N`` rows on every rank); labels:
    ``N`` int64, the positive's column on this rank or ``-1`` where another rank holds it."""
    return _DistributedSoftmaxCE.apply(logits.float(), labels, group)


# --------------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------------


class ShardedMarginHead(nn.Module):
    """This rank's class centres ``C_r x D`` and a margin loss over the global batch.

    Args:
        num_classes: ``C``, all classes (every rank passes the same).
        embed_dim: ``D``.
        loss: the margin loss; an :class:`AdaFace` gets ``sync_stats=False`` because the gathered
            embeddings already give every rank the global norms (its running statistics stay equal).
        partial_fc: as ``head.partial_fc``: 0 = all centres; < 1 a rate; >= 1 a count. The total is
            split over the shards (:func:`shard_sample_counts`); a shard's positives are always kept.
        init_std: std of the normal initialisation, drawn by :func:`init_centre_rows` so that the
            centres are the same at any world size.
        seed: seed of that initialisation.
        group: the process group (default: the world); ``None`` without ``torch.distributed``.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        loss: MarginLoss,
        partial_fc: float = 0.0,
        init_std: float = 0.01,
        seed: int = 0,
        group: Group = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.rank, self.world_size = _world(group)
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.start, self.num_local = shard_range(num_classes, self.rank, self.world_size)
        self.weight = nn.Parameter(init_centre_rows(self.start, self.num_local, embed_dim, init_std, seed))
        if isinstance(loss, AdaFace):
            loss.sync_stats = False
        self.loss = loss
        total = num_sampled_classes(partial_fc, num_classes)
        self.num_sampled = total
        self.num_sampled_local = shard_sample_counts(total, num_classes, self.world_size)[self.rank]
        self.last_index: Tensor | None = None
        """This rank's sampled centres (local indices, sorted) of the last training step; ``None`` = all."""
        self.distill: nn.Module | None = None
        """Set by distillation (:class:`timmface.distill.HeadDistillation`): given the teacher's embeddings of
        the global batch, AdaDistill updates this rank's rows before the logits, and logit KD runs over this
        rank's (sampled) columns with a softmax spanning every rank."""

    @property
    def local_range(self) -> tuple[int, int]:
        """``(start, stop)``: the global class ids ``start <= c < stop`` whose centres live on this rank."""
        return self.start, self.start + self.num_local

    def extra_repr(self) -> str:
        return (
            f"classes={self.start}..{self.start + self.num_local} of {self.num_classes}, dim={self.embed_dim}, "
            f"rank={self.rank}/{self.world_size}, sampled_local={self.num_sampled_local}"
        )

    def local_columns(self, labels: Tensor) -> Tensor:
        """Global class ids ``N`` -> this shard's row index, or ``-1`` where another rank holds the class."""
        local = labels - self.start
        return torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))

    def forward(self, embeddings: Tensor, labels: Tensor, teacher: Tensor | None = None) -> dict[str, Tensor]:
        """embeddings: this rank's ``n_r x D`` (unnormalised); labels: ``n_r`` global class ids; teacher: this
        rank's ``n_r x Dt`` teacher embeddings of the same images (distillation, see :attr:`distill`).

        Returns ``margin``: the mean loss over the global batch (the same on every rank), ``norms``:
        this rank's embedding norms ``n_r`` (detached), and what :attr:`distill` adds.
        """
        emb_local = embeddings.float()
        emb, sizes = all_gather_with_grad(emb_local, self.group)
        all_labels = _gather_rows(labels, sizes, self.group) if self.world_size > 1 else labels
        hook, out = (self.distill if teacher is not None else None), {}
        if hook is not None:  # every rank sees the global batch, in rank order (the global batch order)
            teacher = _gather_rows(teacher.detach().float(), sizes, self.group) if self.world_size > 1 else teacher
            out = hook.before_logits(
                self.weight, emb.detach(), teacher, all_labels, start=self.start, gathered=True, group=self.group
            )
        columns = self.local_columns(all_labels)
        weight = self.weight
        self.last_index = None
        if self.training and self.num_sampled < self.num_classes:
            rows = torch.nonzero(columns >= 0, as_tuple=True)[0]
            index = partial_fc_sample(columns[rows], self.num_local, self.num_sampled_local)
            weight = weight[index]
            columns = columns.index_put((rows,), torch.searchsorted(index, columns[rows]))
            self.last_index = index
        norms = torch.linalg.vector_norm(emb, dim=1)
        # cosines in float32: bf16 would put ~0.25 of noise on logits scaled by 64
        with torch.autocast(emb.device.type, enabled=False):
            cosine = F.normalize(emb, dim=1) @ F.normalize(weight.float(), dim=1).T
        logits = self.loss.margin_logits(cosine, norms, columns)
        margin = distributed_cross_entropy(logits, columns, self.group)
        out.update(margin=margin, norms=torch.linalg.vector_norm(emb_local.detach(), dim=1))
        if hook is not None:
            out.update(hook.logit_loss(cosine, teacher, self.last_index, self.group, self.world_size))
        return out

    # ------------------------------------------------------------------ rows by global class id (distillation)

    def _local_ids(self, class_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Positions in ``class_ids`` that live on this rank, and their local row indices."""
        local = self.local_columns(class_ids.to(self.weight.device))
        keep = torch.nonzero(local >= 0, as_tuple=True)[0]
        return keep, local[keep]

    @torch.no_grad()
    def load_rows(self, class_ids: Tensor, rows: Tensor) -> int:
        """Set the centres of global classes ``class_ids`` (``K``) to ``rows`` (``K x D``) where they live
        on this rank (others are ignored); returns how many rows were set here."""
        keep, local = self._local_ids(class_ids)
        self.weight[local] = rows[keep.to(rows.device)].to(self.weight)
        return int(keep.numel())

    @torch.no_grad()
    def ema_rows(self, class_ids: Tensor, rows: Tensor, momentum: float) -> int:
        """``w_c <- momentum * w_c + (1 - momentum) * mean(rows of class c)`` for this rank's classes.

        class_ids: ``K`` global ids (repeats allowed: their rows are averaged first); rows: ``K x D``.
        Pass the ids and rows of the *global* batch (e.g. all-gathered teacher embeddings) so that
        every shard sees its classes. Returns the number of centres updated here.
        """
        keep, local = self._local_ids(class_ids)
        if keep.numel() == 0:
            return 0
        uniq, inverse = torch.unique(local, return_inverse=True)
        sums = torch.zeros(uniq.numel(), rows.shape[1], device=self.weight.device, dtype=torch.float32)
        sums.index_add_(0, inverse, rows[keep.to(rows.device)].to(sums))
        counts = torch.bincount(inverse, minlength=uniq.numel()).to(sums)[:, None]
        current = self.weight[uniq].float()
        self.weight[uniq] = current.lerp(sums / counts, 1.0 - momentum).to(self.weight.dtype)
        return int(uniq.numel())

    @torch.no_grad()
    def full_weight(self) -> Tensor:
        """All centres ``C x D`` gathered from every rank (for tests and small models; every rank gets them)."""
        if self.world_size == 1:
            return self.weight.detach().clone()
        sizes = [shard_range(self.num_classes, r, self.world_size)[1] for r in range(self.world_size)]
        return _gather_rows(self.weight.detach(), sizes, self.group)


def clip_grad_norm_sharded(
    replicated: Iterable[nn.Parameter], sharded: Iterable[nn.Parameter], max_norm: float, group: Group = None
) -> Tensor:
    """Clip by the norm of *all* gradients: the replicated ones (identical on every rank after DDP)
    plus every rank's shard. Every rank gets the same norm, hence the same clip coefficient, so the
    replicated weights stay identical. Returns the total norm."""
    rep = [p for p in replicated if p.grad is not None]
    shard = [p for p in sharded if p.grad is not None]
    device = (rep or shard)[0].grad.device

    def sq_norm(params: list[nn.Parameter]) -> Tensor:
        if not params:
            return torch.zeros((), device=device)
        return torch.nn.utils.get_total_norm([p.grad for p in params]).float().square()

    rep_sq, shard_sq = sq_norm(rep), sq_norm(shard)
    if _world(group)[1] > 1:
        dist.all_reduce(shard_sq, op=dist.ReduceOp.SUM, group=group)
    total = (rep_sq + shard_sq).sqrt()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_([*rep, *shard], max_norm, total)
    return total
