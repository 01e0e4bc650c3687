"""Distillation: a frozen teacher's embeddings add loss terms to the margin-loss trainer.

:class:`DistillTrainer` is the ordinary :class:`~timmface.trainer.Trainer` with three hooks filled
in; the training loop itself is not forked:

- ``targets()`` gives each step the teacher's embeddings of exactly the images the student sees:
  **online** (the frozen teacher runs on the flipped, normalised batch, under ``no_grad``, outside
  DDP) or **cached** (rows of a ``timmface embed --cache`` file, original or mirrored view by the
  sample's flip bit, so a step costs no teacher forward);
- ``_build_terms()`` adds the loss terms: feature distillation (``1 - cos`` or MSE between the
  L2-normalised student and teacher embeddings, through a learnable projection when the sizes
  differ; the projection is not part of the exported backbone) and relation distillation (the
  in-batch similarity matrices, MSE or row-wise KL with a temperature, optionally over embeddings
  gathered from every rank);
- teacher class centres: each identity's mean normalised teacher embedding, computed once per
  teacher and dataset and saved beside the run, initialises the margin head's centres, optionally
  frozen (MarginDistillation / ProxylessKD) or moved as an EMA of the batch's teacher embeddings
  (AdaDistill).

Cached targets pair a record with its teacher embedding, so any augmentation other than the flip
would distil towards the embedding of a different image: the trainer refuses that combination.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from timmface import distributed as tdist
from timmface.data.batch import Batch
from timmface.errors import ConfigError, DataError
from timmface.trainer import Trainer

__all__ = [
    "FeatureDistillation",
    "RelationDistillation",
    "DistillTrainer",
    "compute_teacher_centres",
    "similarity_kl",
]


# --------------------------------------------------------------------------------------------------
# Loss terms: forward(embeddings, labels, targets) -> (value, weighted value)
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
        self.proj = nn.Linear(student_dim, teacher_dim, bias=False) if student_dim != teacher_dim else None

    def forward(self, embeddings: Tensor, labels: Tensor, targets: dict[str, Any]) -> tuple[Tensor, Tensor]:
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


def similarity_kl(student_sim: Tensor, teacher_sim: Tensor, temperature: float, diag: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher / T) || softmax(student / T)) with ``diag`` masked out, x T^2."""
    neg = torch.finfo(student_sim.dtype).min
    log_p_s = F.log_softmax((student_sim / temperature).masked_fill(diag, neg), dim=1)
    log_p_t = F.log_softmax((teacher_sim / temperature).masked_fill(diag, neg), dim=1)
    p_t = log_p_t.exp()
    kl = (p_t * (log_p_t - log_p_s)).masked_fill(diag, 0.0).sum(1)
    return kl.mean() * temperature**2


class RelationDistillation(nn.Module):
    """Match the in-batch cosine-similarity matrix of the student to the teacher's.

    ``mse``: mean squared difference of the two ``N x M`` matrices (off-diagonal entries; the
    diagonal is 1 in both). ``kl``: :func:`similarity_kl` over rows. With ``gather`` under DDP the
    columns span the embeddings of every rank (student embeddings gathered with their gradient).
    """

    def __init__(self, loss: str = "mse", weight: float = 1.0, temperature: float = 0.1, gather: bool = False) -> None:
        super().__init__()
        if loss not in ("mse", "kl"):
            raise ConfigError(f"distill.relation_loss: '{loss}' is not one of mse, kl")
        self.loss, self.weight, self.temperature, self.gather = loss, weight, temperature, gather

    def _columns(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, int]:
        if not (self.gather and tdist.is_distributed()):
            return s, t, 0
        from torch.distributed.nn.functional import all_gather

        sizes = [torch.zeros(1, dtype=torch.long, device=s.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([s.shape[0]], device=s.device))
        if len({int(x) for x in sizes}) != 1:  # uneven batches (skipped records): use this rank's rows
            return s, t, 0
        s_all = torch.cat(all_gather(s), dim=0)  # differentiable: gradients flow back to every rank
        t_all = torch.cat([x for x in _gather_no_grad(t)], dim=0)
        return s_all, t_all, dist.get_rank() * s.shape[0]

    def forward(self, embeddings: Tensor, labels: Tensor, targets: dict[str, Any]) -> tuple[Tensor, Tensor]:
        s = F.normalize(embeddings.float(), dim=1)
        t = F.normalize(targets["teacher"].float(), dim=1)
        s_cols, t_cols, offset = self._columns(s, t)
        sim_s, sim_t = s @ s_cols.T, t @ t_cols.T
        n, m = sim_s.shape
        diag = torch.zeros(n, m, dtype=torch.bool, device=s.device)
        rows = torch.arange(n, device=s.device)
        diag[rows, rows + offset] = True
        if self.loss == "mse":
            value = (sim_s - sim_t).square().masked_fill(diag, 0.0).sum() / max(1, n * m - n)
        else:
            value = similarity_kl(sim_s, sim_t, self.temperature, diag)
        return value, self.weight * value


def _gather_no_grad(t: Tensor) -> list[Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


# --------------------------------------------------------------------------------------------------
# Teacher class centres
# --------------------------------------------------------------------------------------------------


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
) -> Tensor:
    """``C x D`` unit vectors: per identity, the normalised mean of its images' normalised teacher
    embeddings (original views). From ``cache`` when given (no forward), else by running ``teacher``.
    Under DDP each rank takes every ``world_size``-th record and the sums are all-reduced."""
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
        for batch in loader:
            if len(batch.labels) == 0:
                continue
            emb = teacher(normalize_on_device(batch.images.to(device), None)).float()
            if sums is None:
                sums = torch.zeros(num_classes, emb.shape[1], dtype=torch.float64, device=emb.device)
                counts = torch.zeros(num_classes, dtype=torch.float64, device=emb.device)
            _accumulate(sums, counts, F.normalize(emb, dim=1), batch.labels.to(emb.device))
        assert sums is not None and counts is not None, "empty dataset"
    if tdist.is_distributed():
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    if bool((counts == 0).any()):
        empty = int((counts == 0).nonzero()[0])
        warnings.warn(
            f"teacher class centres: class {empty} has no readable image; its centre stays random", stacklevel=2
        )
        sums[counts == 0] = torch.randn_like(sums[counts == 0])
    return F.normalize((sums / counts.clamp_min(1)[:, None]).float(), dim=1)


def _accumulate(sums: Tensor, counts: Tensor, emb: Tensor, labels: Tensor) -> None:
    sums.index_add_(0, labels, emb.double())
    counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class DistillTrainer(Trainer):
    """:class:`Trainer` + a frozen teacher (online or cached) + distillation terms."""

    def _setup_data(self) -> None:
        super()._setup_data()
        self._setup_teacher()

    # ------------------------------------------------------------------------------------- teacher

    def _setup_teacher(self) -> None:
        dc = self.cfg.distill
        if not dc.teacher and not dc.cache:
            raise ConfigError("distillation needs a teacher: pass --teacher PATH (distill.teacher) or distill.cache")
        if dc.feature_weight == 0 and dc.relation_weight == 0 and dc.centres == "off":
            warnings.warn(
                "all distillation weights are zero and distill.centres=off: this is plain training", stacklevel=2
            )
        self.teacher = None
        self.cache = None
        self.teacher_fingerprint = ""
        if dc.teacher:
            from teachers import load_teacher, teacher_fingerprint

            self.teacher_fingerprint = teacher_fingerprint(dc.teacher)
        from timmface.embedding.cache import dataset_fingerprint

        self.dataset_fingerprint = dataset_fingerprint(self.dataset)
        if dc.cache:
            from timmface.embedding.cache import EmbeddingCache

            if self.has_augmentations:
                raise ConfigError(
                    "distill.cache holds the teacher's embedding of each record and of its mirror image only; "
                    "data.augmentations change the image, so the cached targets would be wrong: remove the "
                    "augmentations (the flip is fine) or run the teacher online (distill.cache='')"
                )
            self.cache = EmbeddingCache.open(dc.cache)
            self.cache.check(self.dataset_fingerprint, self.teacher_fingerprint or None, source="distill.cache")
            cached_size = int(self.cache.meta.get("image_size", self.cfg.data.image_size))
            if cached_size != self.cfg.data.image_size:
                raise DataError(
                    f"{dc.cache}: the teacher saw {cached_size}x{cached_size} images but data.image_size="
                    f"{self.cfg.data.image_size}: rebuild it with timmface embed --image-size "
                    f"{self.cfg.data.image_size}"
                )
            if self.cache.num_records != len(self.dataset):
                raise DataError(
                    f"{dc.cache}: cache has {self.cache.num_records} records, the data has {len(self.dataset)}"
                )
            missing = self.cache.missing()
            if len(missing) and self.is_main:
                print(
                    f"warning: {dc.cache}: {len(missing)} records have no teacher embedding (first: index "
                    f"{int(missing[0])}); training stops if one of them is drawn",
                    flush=True,
                )
            self.teacher_dim = int(self.cache.dim)
        else:
            from teachers import TeacherWrapper

            module = load_teacher(dc.teacher, arch=dc.teacher_arch or None)
            dtype = dc.teacher_dtype
            if self.device.type == "cpu" and dtype == "float16":
                dtype = "float32"  # fp16 convolutions are not implemented on every CPU
            self.teacher = TeacherWrapper(
                module, dtype=dtype, channels_last=self.cfg.model.channels_last, compile=dc.teacher_compile
            ).to(self.device)
            self.teacher_dim = int(self.teacher.embed_dim)
        if self.is_main:
            src = f"cache {dc.cache}" if self.cache is not None else f"teacher {dc.teacher} (online)"
            print(f"distillation from {src}: {self.teacher_dim}-d embeddings", flush=True)

    def targets(self, batch: Batch, images: Tensor, flips: Tensor) -> dict[str, Any]:
        if self.cache is not None:
            teacher = self.cache.lookup(batch.indices.numpy(), batch.flips).to(self.device, non_blocking=True)
        else:
            teacher = self.teacher(images)
        if getattr(self, "_centre_batches", None) is not None:
            self._centre_batches.append((batch.labels.to(self.device), teacher))
        return {"teacher": teacher}

    # --------------------------------------------------------------------------------------- terms

    def _build_terms(self) -> dict[str, nn.Module]:
        dc, dim = self.cfg.distill, self.cfg.model.embed_dim
        terms: dict[str, nn.Module] = {}
        if dc.feature_weight > 0:
            if dim != self.teacher_dim and not dc.allow_projection:
                raise ConfigError(
                    f"the student embeds into {dim} dimensions and the teacher into {self.teacher_dim}: set "
                    f"model.embed_dim={self.teacher_dim} or distill.allow_projection=true"
                )
            terms["kd_feature"] = FeatureDistillation(dim, self.teacher_dim, dc.feature_loss, dc.feature_weight)
        if dc.relation_weight > 0:
            terms["kd_relation"] = RelationDistillation(
                dc.relation_loss, dc.relation_weight, dc.relation_temperature, dc.relation_gather
            )
        return terms

    # -------------------------------------------------------------------------------- class centres

    def _before_wrap(self) -> None:
        """Teacher class centres go into the head before DDP and the optimiser see its parameters."""
        super()._before_wrap()
        self._centre_batches: list[tuple[Tensor, Tensor]] | None = None
        mode = self.cfg.distill.centres
        if mode == "off":
            return
        if self.cfg.model.embed_dim != self.teacher_dim:
            raise ConfigError(
                f"distill.centres={mode} puts teacher centres ({self.teacher_dim}-d) into the margin head: "
                f"set model.embed_dim={self.teacher_dim}"
            )
        weight, (lo, hi) = self._head_rows()
        resuming = self.cfg.resume and (self.cfg.resume != "auto" or self._has_checkpoint())
        if not resuming:  # a resumed run restores the head from its checkpoint
            centres = self._teacher_centres()
            with torch.no_grad():
                weight.copy_(centres[lo:hi].to(weight.device, weight.dtype))
        if mode in ("frozen", "ema"):
            weight.requires_grad_(False)  # moved only by the teacher (ema) or not at all (frozen)
        if mode == "ema":
            self._centre_batches = []

    def _has_checkpoint(self) -> bool:
        from timmface.checkpoint import list_checkpoints

        return bool(list_checkpoints(self.output_dir))

    def _head_rows(self) -> tuple[nn.Parameter, tuple[int, int]]:
        """The head's class-centre parameter and the global class range its rows hold."""
        head = self.model.head if self.model.head is not None else getattr(self, "sharded_head", None)
        if head is None:
            raise ConfigError("distill.centres needs a margin head")
        lo, hi = getattr(head, "local_range", (0, self.num_classes))
        return head.weight, (int(lo), int(hi))

    def _teacher_centres(self) -> Tensor:
        path = self.output_dir / "teacher_centres.safetensors"
        meta = {
            "teacher": self.teacher_fingerprint or (self.cache.teacher_fingerprint if self.cache else ""),
            "dataset": self.dataset_fingerprint,
            "num_classes": str(self.num_classes),
        }
        from safetensors.torch import load_file, safe_open, save_file

        if path.is_file():
            with safe_open(str(path), "pt") as f:
                if f.metadata() == meta:
                    return load_file(str(path))["centres"]
        centres = compute_teacher_centres(
            self.dataset,
            self.num_classes,
            teacher=self.teacher,
            cache=self.cache,
            batch_size=self.cfg.eval_batch_size,
            device=self.device,
            image_size=self.cfg.data.image_size,
            num_workers=min(2, self.cfg.data.num_workers),
            rank=self.world.rank,
            world_size=self.world.world_size,
        ).cpu()
        if self.is_main:
            tmp = path.with_suffix(".tmp")
            save_file({"centres": centres.contiguous()}, str(tmp), metadata=meta)
            tmp.replace(path)
            (self.output_dir / "teacher_centres.json").write_text(json.dumps(meta, indent=1))
        return centres

    def train_step(self) -> dict[str, float]:
        values = super().train_step()
        if getattr(self, "_centre_batches", None) is not None:
            self._update_centres()
        return values

    @torch.no_grad()
    def _update_centres(self) -> None:
        """AdaDistill-style: centre_c <- normalise(m * centre_c + (1 - m) * mean teacher embedding of c)."""
        batches, self._centre_batches = self._centre_batches, []
        if not batches:
            return
        labels = torch.cat([b[0] for b in batches])
        emb = F.normalize(torch.cat([b[1] for b in batches]).float(), dim=1)
        if tdist.is_distributed():
            labels = tdist.all_gather_concat(labels)
            emb = tdist.all_gather_concat(emb)
        weight, (lo, hi) = self._head_rows()
        mine = (labels >= lo) & (labels < hi)
        labels, emb = labels[mine] - lo, emb[mine]
        if labels.numel() == 0:
            return
        sums = torch.zeros(hi - lo, emb.shape[1], device=emb.device).index_add_(0, labels, emb)
        classes = torch.unique(labels)
        means = F.normalize(sums[classes], dim=1)
        m = self.cfg.distill.centres_momentum
        rows = F.normalize(weight[classes].float(), dim=1)
        weight[classes] = F.normalize(m * rows + (1 - m) * means.to(rows.device), dim=1).to(weight.dtype)

    def describe(self) -> str:
        terms = ", ".join(self.model.terms.keys()) or "no feature terms"
        return f"{super().describe()}; distillation: {terms}, centres={self.cfg.distill.centres}"
