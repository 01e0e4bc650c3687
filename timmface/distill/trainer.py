"""The distillation trainer: :class:`~timmface.trainer.Trainer` with a frozen teacher and the terms of
:mod:`timmface.distill`; the training loop itself is not forked."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from timmface import distributed as tdist
from timmface.data.batch import Batch
from timmface.distill.centres import HeadDistillation, compute_teacher_centres, ema_update_
from timmface.distill.memory import TeacherMemory
from timmface.distill.terms import (
    EvaluationOrientedDistillation,
    FeatureDistillation,
    RelationDistillation,
    float32_math,
)
from timmface.errors import ConfigError, DataError
from timmface.fileio import atomic_path, atomic_write
from timmface.trainer import Trainer

__all__ = ["DistillTrainer"]

TEACHER_EVAL_FILE = "teacher_eval.json"


class DistillTrainer(Trainer):
    """:class:`Trainer` + a frozen teacher (online or cached) + distillation terms.

    Hooks it fills: ``targets()`` (the teacher's embeddings of the step's images, and the teacher memory),
    ``_build_terms()`` (feature, relation, EKD terms), ``_before_wrap()`` (teacher class centres and the
    margin head's AdaDistill / logit-KD hook), ``_forward()`` (``distill/cos_st``), ``state_dict()`` /
    ``_load_extra_state()`` (the memory), ``evaluate()`` (the teacher's accuracy beside the student's).
    """

    uses_teacher = True

    def _setup_data(self) -> None:
        super()._setup_data()
        self._setup_teacher()

    # ------------------------------------------------------------------------------------- teacher

    def _setup_teacher(self) -> None:
        dc = self.cfg.distill
        if not dc.teacher and not dc.cache:
            raise ConfigError("distillation needs a teacher: pass --teacher PATH (distill.teacher) or distill.cache")
        weights = (dc.feature_weight, dc.relation_weight, dc.ekd_weight, dc.logit_weight)
        if not any(weights) and dc.centres == "off":
            warnings.warn(
                "all distillation weights are zero and distill.centres=off: this is plain training", stacklevel=2
            )
        self.teacher = None
        self.cache = None
        self.teacher_fingerprint = ""
        if dc.teacher:
            from teachers import teacher_fingerprint

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
            self.teacher = self._load_teacher_module()
            self.teacher_dim = int(self.teacher.embed_dim)
        self._check_dims()
        self.memory = TeacherMemory(dc.memory_size, self.teacher_dim, self.device) if dc.memory_size > 0 else None
        self._teacher_eval: dict[str, float] | None = None
        if self.is_main:
            online = f"teacher {dc.teacher} (online: {self.teacher.describe()})" if self.teacher is not None else ""
            src = f"cache {dc.cache}" if self.cache is not None else online
            print(f"distillation from {src}: {self.teacher_dim}-d embeddings", flush=True)

    def _load_teacher_module(self) -> nn.Module:
        from teachers import load_teacher, online_teacher

        dc = self.cfg.distill
        module = load_teacher(dc.teacher, arch=dc.teacher_arch or None)
        # compile=auto: on CUDA; a convolutional teacher channels-last on CUDA; low precision for the trunk only
        return online_teacher(module, self.device, dc.teacher_dtype, dc.teacher_compile, self.cfg.model.channels_last)

    def _check_dims(self) -> None:
        """Combinations that need the teacher's embedding size (the rest: :func:`timmface.config.validate`)."""
        dc, dim, tdim = self.cfg.distill, self.cfg.model.embed_dim, self.teacher_dim
        if dim == tdim:
            return
        fix = f"set model.embed_dim={tdim}"
        if dc.centres != "off":
            raise ConfigError(
                f"distill.centres={dc.centres} compares the margin head's centres with teacher embeddings "
                f"({tdim}-d) but the student embeds into {dim}: {fix}"
            )
        if not dc.allow_projection:
            if dc.feature_weight > 0:
                raise ConfigError(
                    f"the student embeds into {dim} dimensions and the teacher into {tdim}: {fix} or "
                    "distill.allow_projection=true"
                )
            if dc.memory_size > 0:
                raise ConfigError(
                    f"distill.memory_size compares student embeddings with the teacher's (s_i . m_j) but the "
                    f"student embeds into {dim} dimensions and the teacher into {tdim}: {fix} or "
                    "distill.allow_projection=true"
                )

    def targets(self, batch: Batch, images: Tensor, flips: Tensor) -> dict[str, Any]:
        if self.cache is not None:
            teacher = self.cache.lookup(batch.indices.numpy(), batch.flips).to(self.device, non_blocking=True)
        else:
            teacher = self.teacher(images)
        labels = batch.labels.to(self.device, non_blocking=True)  # a blocking copy would wait for the device
        if getattr(self, "_centre_batches", None) is not None:
            self._centre_batches.append((labels, teacher))
        out: dict[str, Any] = {"teacher": teacher}
        if self.memory is not None:
            out.update(self._push_memory(teacher, labels))
        return out

    def _push_memory(self, teacher: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Push every rank's teacher embeddings of this micro-step (rank order, the global batch order) into
        the memory, on every rank alike; the relation terms get the memory and this rank's own slots."""
        offset = 0
        t, lab = teacher.detach().float(), labels
        if tdist.is_distributed():
            sizes = [torch.zeros(1, dtype=torch.long, device=lab.device) for _ in range(dist.get_world_size())]
            dist.all_gather(sizes, torch.tensor([lab.numel()], device=lab.device))
            offset = int(sum(int(s) for s in sizes[: dist.get_rank()]))
            t, lab = tdist.all_gather_concat(t), tdist.all_gather_concat(lab)
        slots = self.memory.push(t, lab)[offset : offset + labels.numel()]
        emb, mem_labels = self.memory.view()
        return {"memory_emb": emb, "memory_labels": mem_labels, "memory_slots": slots}

    # --------------------------------------------------------------------------------------- terms

    def _build_terms(self) -> dict[str, nn.Module]:
        dc, dim, tdim = self.cfg.distill, self.cfg.model.embed_dim, self.teacher_dim
        memory = dc.memory_size > 0
        terms: dict[str, nn.Module] = {}
        if dc.feature_weight > 0:
            terms["kd_feature"] = FeatureDistillation(dim, tdim, dc.feature_loss, dc.feature_weight)
        if dc.relation_weight > 0:
            terms["kd_relation"] = RelationDistillation(
                dc.relation_loss, dc.relation_weight, dc.relation_temperature, dc.relation_gather, memory, dim, tdim
            )
        if dc.ekd_weight > 0:
            terms["kd_ekd"] = EvaluationOrientedDistillation(
                dc.ekd_weight, dc.ekd_temperature, dc.ekd_topk, dc.relation_gather, memory, dim, tdim
            )
        return terms

    def _forward(self, x: Tensor, labels: Tensor, targets: dict[str, Any]) -> dict[str, Tensor]:
        out = super()._forward(x, labels, targets)
        with torch.no_grad(), float32_math(x.device):  # distill/cos_st: how close the student is to its teacher
            s = out["embeddings"].detach().float()
            feature = self.model.terms["kd_feature"] if "kd_feature" in self.model.terms else None
            if feature is not None and feature.proj is not None:
                s = feature.proj(s)
            if s.shape[1] == self.teacher_dim:
                out["distill/cos_st"] = F.cosine_similarity(s, targets["teacher"].float(), dim=1).mean()
        return out

    # -------------------------------------------------------------------------------- class centres

    def _before_wrap(self) -> None:
        """Teacher class centres and the head's distillation hook go in before DDP and the optimiser see it."""
        super()._before_wrap()
        dc = self.cfg.distill
        self._centre_batches: list[tuple[Tensor, Tensor]] | None = None
        mode = dc.centres
        from_teacher = mode in ("init", "frozen", "ema") or (mode == "adadistill" and dc.centres_init == "teacher")
        if mode == "off" and dc.logit_weight <= 0:
            return
        head, weight, (lo, hi) = self._head_rows()
        centres = self._teacher_centres() if from_teacher or dc.logit_weight > 0 else None
        resuming = self.cfg.resume and (self.cfg.resume != "auto" or self._has_checkpoint())
        if from_teacher and not resuming:  # a resumed run restores the head from its checkpoint
            with torch.no_grad():
                weight.copy_(centres[lo:hi].to(weight.device, weight.dtype))
        if mode in ("frozen", "ema"):
            weight.requires_grad_(False)  # moved only by the teacher (ema) or not at all (frozen)
        if mode == "ema":
            self._centre_batches = []
        if mode == "adadistill" or dc.logit_weight > 0:
            head.distill = HeadDistillation(
                adadistill=mode == "adadistill",
                logit_weight=dc.logit_weight,
                logit_temperature=dc.logit_temperature,
                logit_scale=self.cfg.loss.s,
                teacher_centres=centres[lo:hi] if dc.logit_weight > 0 else None,
            ).to(self.device)

    def _has_checkpoint(self) -> bool:
        from timmface.checkpoint import list_checkpoints

        return bool(list_checkpoints(self.output_dir))

    def _head_rows(self) -> tuple[nn.Module, nn.Parameter, tuple[int, int]]:
        """The margin head, its class-centre parameter and the global class range its rows hold."""
        head = self.margin_head
        if head is None:
            raise ConfigError("distill.centres and distill.logit_weight need a margin head")
        lo, hi = getattr(head, "local_range", (0, self.num_classes))
        return head, head.weight, (int(lo), int(hi))

    def _teacher_centres(self) -> Tensor:
        """Each identity's mean teacher embedding, ``C x Dt``, computed once and kept in the run folder."""
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
            num_workers=self.cfg.data.num_workers,
            rank=self.world.rank,
            world_size=self.world.world_size,
            progress=self.is_main and self.cfg.log.progress != "off",
        ).cpu()
        if self.is_main:
            with atomic_path(path, hidden=True) as tmp:  # (safetensors alone would create it 0600)
                save_file({"centres": centres.contiguous()}, str(tmp), metadata=meta)
            (self.output_dir / "teacher_centres.json").write_text(json.dumps(meta, indent=1))
        return centres

    def train_step(self) -> dict[str, float]:
        values = super().train_step()
        if getattr(self, "_centre_batches", None) is not None:
            self._update_centres()
        return values

    @torch.no_grad()
    def _update_centres(self) -> None:
        """``distill.centres=ema``, after the optimiser step: :func:`~timmface.distill.centres.ema_update_` with
        every rank's teacher embeddings of the step, on the rows this rank holds."""
        batches, self._centre_batches = self._centre_batches, []
        if not batches:
            return
        labels = torch.cat([b[0] for b in batches])
        emb = torch.cat([b[1] for b in batches]).float()
        if tdist.is_distributed():
            labels, emb = tdist.all_gather_concat(labels), tdist.all_gather_concat(emb)
        _, weight, (lo, hi) = self._head_rows()
        mine = (labels >= lo) & (labels < hi)
        ema_update_(weight, emb[mine], labels[mine] - lo, self.cfg.distill.centres_momentum)

    # ------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.memory is not None:  # the same on every rank: rank 0's main file holds it
            state["distill_memory"] = self.memory.state_dict()
        return state

    def _load_extra_state(self, ckpt: dict[str, Any]) -> None:
        super()._load_extra_state(ckpt)
        if self.memory is None:
            return
        saved = ckpt.get("distill_memory")
        if saved is None or not self.memory.load_state_dict(saved):
            if self.is_main:
                print(
                    "note: the checkpoint holds no teacher memory of this size (distill.memory_size="
                    f"{self.cfg.distill.memory_size}); it refills from the next steps",
                    flush=True,
                )

    # ---------------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float]:
        """The student's accuracies, and beside them the teacher's on the same sets (``teacher_acc/<set>``),
        computed once (the teacher is frozen) and kept in the run folder (``teacher_eval.json``)."""
        results = super().evaluate()
        if not results:
            return results
        teacher = self._teacher_accuracies()
        if teacher:
            self.metrics.log(self.step, teacher)
        return {**results, **teacher}

    def _teacher_eval_key(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher_fingerprint or (self.cache.teacher_fingerprint if self.cache else ""),
            "sets": [[str(p), p.stat().st_size] for p in self.val_sets],
            "eval_flip": self.cfg.eval_flip,
            "image_size": self.cfg.data.image_size,
        }

    def _teacher_accuracies(self) -> dict[str, float]:
        if self._teacher_eval is not None:
            return self._teacher_eval
        path = self.output_dir / TEACHER_EVAL_FILE
        key = self._teacher_eval_key()
        stored = None
        if self.is_main and path.is_file():
            try:
                saved = json.loads(path.read_text())
                stored = saved["results"] if saved.get("key") == key else None
            except (ValueError, KeyError, TypeError):
                stored = None
        stored = tdist.broadcast_object(stored)  # one decision for every rank: the embedding below is collective
        if stored is None:
            stored = self._run_teacher_eval(path, key)
        self._teacher_eval = dict(stored)
        return self._teacher_eval

    @torch.no_grad()
    def _run_teacher_eval(self, path: Path, key: dict[str, Any]) -> dict[str, float]:
        from timmface.evaluation.verification import verification_metrics

        module = self.teacher
        if module is None:
            if not self.cfg.distill.teacher:
                if self.is_main:
                    print(
                        "note: the teacher's accuracy is not shown: distillation from a cache without "
                        "distill.teacher has no teacher model to evaluate",
                        flush=True,
                    )
                return {}
            module = self._load_teacher_module()  # cached distillation: the teacher runs for evaluation only
        results: dict[str, float] = {}
        for val in self.val_sets:
            images, issame = self._read_val(val)
            emb = self.embed_images(module, images)
            res = verification_metrics(emb[0::2], emb[1::2], issame)
            results[f"teacher_acc/{Path(val).stem}"] = res.accuracy
            results[f"teacher_acc_std/{Path(val).stem}"] = res.std
        if self.is_main:
            with atomic_write(path, hidden=True) as f:
                f.write(json.dumps({"key": key, "results": results}, indent=1).encode())
        return results

    def describe(self) -> str:
        dc = self.cfg.distill
        terms = ", ".join(self.model.terms.keys()) or "no feature terms"
        extra = [f"centres={dc.centres}" + (f" ({dc.centres_init} init)" if dc.centres == "adadistill" else "")]
        if dc.logit_weight > 0:
            extra.append(f"logit KD x{dc.logit_weight:g} at T={dc.logit_temperature:g}")
        if self.memory is not None:
            extra.append(f"teacher memory of {dc.memory_size}")
        return f"{super().describe()}; distillation: {terms}, {', '.join(extra)}"
