"""The training loop: margin-loss training of a timm backbone (and distillation, which adds terms).

``Trainer(cfg).fit()`` reads as the algorithm; set-up is split into ``_setup_*`` methods. The class, top to
bottom: set-up (runtime, output folder, data, model, optimiser, logging), the state a checkpoint holds and
resuming from it, one optimiser step (``train_step``: micro-batches, AMP, non-finite handling), ``fit``, and the
periodic evaluation on ``.bin`` sets. Device choice, seeding, RNG state and compilation are in
:mod:`timmface.runtime`; the data pipeline in :mod:`timmface.data`; distillation subclasses this class
(:mod:`timmface.distill`) and fills three hooks instead of forking the loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from timmface import distributed as tdist
from timmface.checkpoint import (
    checkpoint_path,
    checkpoint_shards,
    clean_state_dict,
    list_checkpoints,
    load_checkpoint,
    load_resume,
    merge_checkpoint,
    read_head_rows,
    save_checkpoint,
    save_shard,
)
from timmface.config import Config, DemoConfig, diff_configs, save_config
from timmface.data.batch import Batch, DeviceNormalizer
from timmface.data.gpu_decode import check_gpu_decode, resolve_decode_device
from timmface.data.loader import build_dataset, build_train_loader, dataset_num_classes
from timmface.data.transforms import build_transform
from timmface.ema import EMA
from timmface.errors import CheckpointError, ConfigError, DataError, TimmfaceError
from timmface.evaluation.verification import embed_uint8, verification_metrics
from timmface.faults import fault
from timmface.losses import AdaFace, build_loss
from timmface.metrics import MetricsWriter, Progress
from timmface.model import FaceModel, MarginHead
from timmface.optim import build_optimizer, cosine_lr, set_lr, warmup_steps
from timmface.partial_fc import ShardedMarginHead, clip_grad_norm_sharded, scale_grad
from timmface.runtime import compile_module, pick_device, rng_state, seed_everything, set_rng_state

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}
MODEL_KEYS = ("model.backbone", "model.kwargs", "model.embed_dim")


def _val_name(path: str | Path) -> str:
    return Path(path).stem


def demo_data_path(demo: DemoConfig) -> str:
    """The folder of the built-in demo dataset for these settings, generated (once, cached) if missing."""
    from timmface.data.demo import load_or_generate_demo

    cache = demo.cache_dir or os.environ.get("TIMMFACE_CACHE") or str(Path.home() / ".cache" / "timmface")
    params = dict(
        num_identities=demo.num_identities,
        images_per_identity=demo.images_per_identity,
        num_val_identities=demo.num_val_identities,
        num_val_pairs=demo.num_val_pairs,
        difficulty=demo.difficulty,
        seed=demo.seed,
    )
    return str(load_or_generate_demo(Path(cache) / "demo", **params))


class Trainer:
    """Builds everything a run needs from a :class:`~timmface.config.Config` and trains it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.step = 0
        self.counters = {"nonfinite": 0, "bad_records": 0, "seen_records": 0}
        self.first_bad: tuple[Any, str] | None = None
        self._said_resized = False
        self.last_eval: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self._setup_runtime()
        self._setup_output()
        self._setup_data()
        self._setup_model()
        self._setup_optim()
        self._resume()
        self._setup_logging()

    # ---------------------------------------------------------------------------------------- set-up

    def _setup_runtime(self) -> None:
        cfg = self.cfg
        info = tdist.world_info_from_env()
        self.device = pick_device(cfg.device, info.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = not cfg.deterministic
        elif info.distributed:  # CPU processes on one machine share its cores
            local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        self.world = tdist.init_distributed(self.device, cfg.dist_timeout)
        self.is_main = self.world.is_main
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed + self.world.rank)
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        if self.amp_dtype is torch.float16 and self.device.type == "cpu":
            warnings.warn("amp=float16 on CPU is slow and rarely useful; consider amp=bfloat16", stacklevel=2)

    def _setup_output(self) -> None:
        cfg = self.cfg
        self.output_dir = Path(cfg.output_dir)
        existing = list_checkpoints(self.output_dir)
        resuming = cfg.resume == "auto" and existing or (cfg.resume and cfg.resume != "auto")
        if existing and not resuming:
            if not cfg.overwrite:
                raise ConfigError(
                    f"{self.output_dir}: already holds checkpoints of a run; pass resume=auto to continue it, "
                    "overwrite=true to start over, or choose another output_dir"
                )
            if self.is_main:
                shutil.rmtree(self.output_dir / "checkpoints", ignore_errors=True)
                (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
        tdist.barrier()
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")

    def _setup_data(self) -> None:
        cfg = self.cfg
        path = cfg.data.path
        if cfg.data.demo.enabled and not path:
            path = self._demo_path()
        self.data_path = path
        self.dataset = build_dataset(path, cfg.data.format)
        self.num_classes = dataset_num_classes(self.dataset, cfg.data.num_classes)
        if self.num_classes < 2:
            raise DataError(f"{path}: found {self.num_classes} classes; margin losses need at least 2")
        transform = build_transform(cfg.data.augmentations)
        self.has_augmentations = transform is not None
        decode_device = resolve_decode_device(cfg.data.decode, self.device)
        if decode_device is not None:
            check_gpu_decode(decode_device, transform, cfg.data.image_size)
        self.loader = build_train_loader(
            self.dataset,
            cfg.batch_size,
            rank=self.world.rank,
            world_size=self.world.world_size,
            grad_accum=cfg.optim.grad_accum,
            seed=cfg.seed,
            hflip=cfg.data.hflip,
            transform=transform,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=cfg.data.prefetch_factor,
            image_size=cfg.data.image_size,
            decode_device=decode_device,
        )
        self.to_device = DeviceNormalizer(self.device, cfg.model.channels_last)
        if cfg.data.val_sets:
            self.val_sets = [Path(p) for p in cfg.data.val_sets]
            missing = [str(p) for p in self.val_sets if not p.is_file()]
            if missing:
                raise DataError(f"{missing[0]}: verification set not found (data.val_sets)")
        else:
            folder = Path(path)
            self.val_sets = sorted(folder.glob("*.bin")) if folder.is_dir() else []
        self._val_cache: dict[Path, tuple[list[bytes], list[bool]]] = {}

    def _demo_path(self) -> str:
        """The built-in demo data, generated on first use (by rank 0; the others wait, then read it)."""
        if self.is_main:
            path = demo_data_path(self.cfg.data.demo)
        tdist.barrier()
        if not self.is_main:
            path = demo_data_path(self.cfg.data.demo)
        return path

    def _build_loss(self) -> nn.Module:
        lc = self.cfg.loss
        loss = build_loss(lc.name, s=lc.s, m=lc.m, h=lc.h, t_alpha=lc.t_alpha, straight_through=lc.straight_through)
        if isinstance(loss, AdaFace):
            loss.sync_stats = self.world.distributed
        return loss

    def _setup_model(self) -> None:
        from students import create_student

        cfg = self.cfg
        backbone = create_student(
            cfg.model.backbone, embed_dim=cfg.model.embed_dim, pretrained=cfg.model.pretrained, **cfg.model.kwargs
        )
        head: MarginHead | None = None
        self.sharded_head: ShardedMarginHead | None = None
        if cfg.head.sharded:
            # sharded at every world size (1 = one shard): one code path and one checkpoint layout, so a
            # run resumes at any other world size. Outside DDP: each rank owns its rows (see _forward).
            self.sharded_head = ShardedMarginHead(
                self.num_classes, cfg.model.embed_dim, self._build_loss(), cfg.head.partial_fc, cfg.head.init_std,
                seed=cfg.seed,
            ).to(self.device)  # fmt: skip
        else:
            head = MarginHead(
                self.num_classes, cfg.model.embed_dim, self._build_loss(), cfg.head.partial_fc, cfg.head.init_std
            )
        self.model = FaceModel(backbone, head, self._build_terms(), margin_weight=cfg.distill.margin_weight)
        self.model.to(self.device)
        if cfg.model.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema = (
            EMA(self.model.backbone, cfg.ema.decay, cfg.ema.warmup_steps, cfg.ema.every) if cfg.ema.enabled else None
        )
        self._before_wrap()
        if cfg.compile:
            # compile before DDP wraps the model (DDP then splits the graph at its buckets)
            compile_module(self.model.backbone, cfg.compile_fullgraph, cfg.model.backbone)
        self.ddp_model: nn.Module = self.model
        if self.world.distributed:
            self.ddp_model = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # buffers (BatchNorm statistics, AdaFace's norm statistics) start equal, then stay per rank
                # (torch 2.14 deprecates broadcast_buffers=False for this)
                forward_sync_buffers=False,
            )

    def _build_terms(self) -> dict[str, nn.Module]:
        """Extra loss terms (distillation); none for plain training."""
        return {}

    def _before_wrap(self) -> None:
        """Last changes to the model (e.g. freezing parameters) before compile and DDP see it."""

    @property
    def margin_head(self) -> MarginHead | ShardedMarginHead | None:
        """The class centres in use: the sharded head (``head.sharded``: this rank's rows, see its
        ``local_range`` / ``load_rows`` / ``ema_rows``) or ``model.head``."""
        return self.sharded_head if self.sharded_head is not None else self.model.head

    def _trainable_parameters(self) -> list[nn.Parameter]:
        """Backbone, head, then the rest: the order ``FaceModel.parameters()`` has with its own head, so the
        optimiser's state indices are the same whether or not the head is sharded (checkpoints convert)."""
        if self.sharded_head is None:
            return list(self.model.parameters())
        rest = [p for name, p in self.model.named_parameters() if not name.startswith("backbone.")]
        return [*self.model.backbone.parameters(), *self.sharded_head.parameters(), *rest]

    def _setup_optim(self) -> None:
        cfg = self.cfg
        params = [p for p in self._trainable_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg.optim)
        head = self.margin_head
        # where the class centres' state sits in optimizer.state_dict()["state"] (None: frozen centres)
        self.head_optim_index = next((i for i, p in enumerate(params) if head is not None and p is head.weight), None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        self.warmup = warmup_steps(cfg.optim.warmup, cfg.total_steps)

    def _setup_logging(self) -> None:
        cfg = self.cfg
        self.metrics = MetricsWriter(
            self.output_dir,
            enabled=self.is_main,
            wandb=cfg.log.wandb,
            tensorboard=cfg.log.tensorboard,
            wandb_project=cfg.log.wandb_project,
            config=asdict(cfg),
        )
        self.metrics.truncate_after(self.step)

    # ---------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What every rank holds alike (rank 0 writes it); with a sharded head, all but its rows."""
        model = self.model
        head = clean_state_dict(model.head.state_dict()) if model.head is not None else None
        optimizer = self.optimizer.state_dict()
        sharding = None
        if self.sharded_head is not None:
            head = {k: v for k, v in clean_state_dict(self.sharded_head.state_dict()).items() if k != "weight"}
            optimizer = {
                **optimizer,
                "state": {k: v for k, v in optimizer["state"].items() if k != self.head_optim_index},
            }
            sharding = {
                "num_classes": self.num_classes,
                "world_size": self.world.world_size,
                "optim_index": self.head_optim_index,
            }
        return {
            "config": asdict(self.cfg),
            "num_classes": self.num_classes,
            "world_size": self.world.world_size,
            "model": clean_state_dict(model.backbone.state_dict()),
            "head": head,
            "sharding": sharding,
            "terms": clean_state_dict(model.terms.state_dict()),
            "ema": self.ema.state_dict()["module"] if self.ema is not None and self.ema.active else None,
            "ema_state": {"active": self.ema.active} if self.ema is not None else None,
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng_state(self.device),
            "counters": {**self.counters, "elapsed_s": self.elapsed()},
            "first_bad": list(self.first_bad) if self.first_bad is not None else None,  # named by a later stop
            "metrics": dict(self.last_eval),
        }

    def rank_state_dict(self) -> dict[str, Any]:
        """What only this rank holds: its RNG state and, with a sharded head, its centres and their optimiser state."""
        state: dict[str, Any] = {"rng": rng_state(self.device)}
        head = self.sharded_head
        if head is not None:
            opt = self.optimizer.state_dict()["state"]
            state["head_rows"] = {
                "start": head.start,
                "count": head.num_local,
                "weight": head.weight.detach(),
                "optim": opt.get(self.head_optim_index) if self.head_optim_index is not None else None,
            }
        return state

    def save(self) -> Path:
        """Every rank writes its rank file (multi-rank or sharded runs), then rank 0 the main file.

        A rank that cannot write (a full disk) stops every rank at once, each naming the file: the ranks
        agree on success with one all-reduce instead of the others waiting ``dist_timeout`` at a barrier.
        The previous checkpoint stays the newest complete one.
        """
        world, rank = self.world.world_size, self.world.rank
        rank_files = world if world > 1 or self.sharded_head is not None else 0

        def shard() -> None:
            save_shard(self.rank_state_dict(), self.output_dir, self.step, rank, world)

        def main_file() -> None:
            if self.is_main:  # after every rank file is on disk: the main file makes the step complete
                save_checkpoint(self.state_dict(), self.output_dir, self.step, self.cfg.keep_last, rank_files)

        if rank_files:
            self._all_or_none(shard)
        self._all_or_none(main_file)
        self.last_checkpoint = checkpoint_path(self.output_dir, self.step)
        return self.last_checkpoint

    def _all_or_none(self, write: Callable[[], None]) -> None:
        """Run ``write`` on every rank; if it failed on any, raise there (its error) and on the others."""
        error: CheckpointError | None = None
        try:
            write()
        except CheckpointError as e:
            error = e
        failed = tdist.all_reduce_max(float(error is not None), self.device)  # doubles as the barrier
        if error is not None:
            raise error
        if failed:
            raise CheckpointError(
                f"{checkpoint_path(self.output_dir, self.step)}: another rank could not write its part of the "
                "checkpoint (its log names the file and the reason); stopping"
            )

    def _check_compatible(self, ckpt: dict[str, Any], path: Path) -> None:
        saved = ckpt.get("config") or {}
        changed = diff_configs(saved, asdict(self.cfg))
        model_changes = [k for k in changed if k.startswith(MODEL_KEYS)]
        if model_changes:
            shown = ", ".join(
                f"{k}: {_lookup(saved, k)!r} -> {_lookup(asdict(self.cfg), k)!r}" for k in model_changes[:3]
            )
            raise CheckpointError(f"{path}: checkpoint's model differs from the config ({shown})")
        if int(ckpt.get("num_classes", self.num_classes)) != self.num_classes:
            raise CheckpointError(
                f"{path}: checkpoint has {ckpt['num_classes']} classes, the data has {self.num_classes}"
            )
        other = [k for k in changed if k not in ("resume", "overwrite") and not k.startswith(MODEL_KEYS)]
        if other and self.is_main:
            print(f"resuming with changed settings: {', '.join(other[:8])}", flush=True)

    def _resume(self) -> None:
        found = load_resume(self.cfg.resume, self.output_dir)
        if found is None:
            return
        path, ckpt = found
        self._check_compatible(ckpt, path)
        try:
            self.model.backbone.load_state_dict(ckpt["model"])
            optimizer = self._load_head(path, ckpt)
            self.model.terms.load_state_dict(ckpt.get("terms") or {})
            self.optimizer.load_state_dict(optimizer)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise CheckpointError(f"{path}: does not fit this run's model ({first})") from e
        if self.ema is not None and ckpt.get("ema_state"):
            if ckpt.get("ema") is not None:
                self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.active = bool(ckpt["ema_state"]["active"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.loader.load_state_dict(ckpt["loader"])
        if int(ckpt.get("rank_files") or 0) == self.world.world_size:  # this rank's own RNG
            own = checkpoint_shards(path, ckpt)[self.world.rank]
            set_rng_state(load_checkpoint(own, mmap=True)["rng"], self.device)
        elif int(ckpt.get("world_size", 1)) == self.world.world_size:
            set_rng_state(ckpt["rng"], self.device)
        self.counters.update(ckpt.get("counters") or {})  # non-finite and bad-record budgets span resumes
        if ckpt.get("first_bad"):
            self.first_bad = (ckpt["first_bad"][0], str(ckpt["first_bad"][1]))
        self.last_eval = dict(ckpt.get("metrics") or {})
        self.step = int(ckpt["step"])
        self.last_checkpoint = path
        if self.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _load_head(self, path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
        """Load the class centres from a checkpoint of any layout (full or sharded, any world size);
        returns the optimiser state to load, holding this run's share of the centres' state."""
        optimizer = ckpt["optimizer"]
        head, index = self.sharded_head, self.head_optim_index
        if head is not None:
            rows, rows_optim = read_head_rows(path, ckpt, head.start, head.num_local, index)
            replicated = {k: v for k, v in (ckpt.get("head") or {}).items() if k != "weight"}
            head.load_state_dict({**replicated, "weight": rows})
            state = {k: v for k, v in optimizer["state"].items() if k != index}
            if rows_optim is not None and index is not None:
                state[index] = rows_optim
            return {**optimizer, "state": state}
        if ckpt.get("sharding"):
            ckpt = merge_checkpoint(path, ckpt)
        if self.model.head is not None and ckpt.get("head") is not None:
            self.model.head.load_state_dict(ckpt["head"])
        return ckpt["optimizer"]

    # ------------------------------------------------------------------------------------- training

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def targets(self, batch: Batch, images: Tensor, flips: Tensor) -> dict[str, Any]:
        """Per-sample extras for the loss terms (teacher embeddings); none for plain training."""
        return {}

    def _account_bad(self, batch: Batch) -> None:
        if batch.resized and not self._said_resized:  # once per run, not once per image
            self._said_resized = True
            if self.is_main:
                h, w = batch.resized_from or (0, 0)
                size = self.cfg.data.image_size
                print(f"note: {self.data_path}: images of another size (first: {h}x{w}) are resized to "
                      f"{size}x{size} (bilinear, antialiased) as they are read; said once", flush=True)  # fmt: skip
        self.counters["seen_records"] += len(batch.labels) + len(batch.bad)
        if not batch.bad:
            return
        self.counters["bad_records"] += len(batch.bad)
        if self.first_bad is None:
            self.first_bad = (batch.bad[0][1], batch.bad[0][2])
        for _, _key, message in batch.bad[:3]:
            print(f"warning: skipped a record that failed to decode: {message}", flush=True)
        limit = self.cfg.data.max_bad_fraction
        fraction = self.counters["bad_records"] / max(self.counters["seen_records"], 1000)
        if fraction > limit:
            key, message = self.first_bad
            raise DataError(
                f"{self.data_path}: {self.counters['bad_records']} of {self.counters['seen_records']} records failed "
                f"to decode (more than data.max_bad_fraction={limit}); first bad record: key {key} ({message})"
            )

    def _forward(self, x: Tensor, labels: Tensor, targets: dict[str, Any]) -> dict[str, Tensor]:
        """The (DDP-wrapped) model's loss terms; with a sharded head, plus its margin loss on the
        embeddings the model returns."""
        out = self.ddp_model(x, labels, targets)
        if self.sharded_head is not None:
            # DDP averages the backbone's gradients over ranks, but the sharded loss is already the
            # mean over the global batch: scale its embedding gradient by W to undo the averaging
            embeddings = scale_grad(out["embeddings"], float(self.world.world_size))
            margin = self.sharded_head(embeddings, labels)["margin"]
            out["margin"] = margin
            out["loss"] = out["loss"] + self.model.margin_weight * margin
        return out

    def _micro_step(self, batch: Batch, sync: bool, scale: float) -> dict[str, Tensor]:
        x, labels, flips = self.to_device(batch)
        targets = self.targets(batch, x, flips)
        no_sync = isinstance(self.ddp_model, DistributedDataParallel) and not sync
        with self.ddp_model.no_sync() if no_sync else contextlib.nullcontext():
            with self.autocast():
                out = self._forward(x, labels, targets)
            self.scaler.scale(out["loss"] * scale).backward()
        return out

    def train_step(self) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; returns the logged values."""
        cfg = self.cfg
        lr = cosine_lr(self.step, cfg.optim.lr, cfg.total_steps, self.warmup, cfg.optim.final_lr_mult)
        set_lr(self.optimizer, lr)
        accum = cfg.optim.grad_accum
        sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        norms = []
        n_images = 0
        for micro in range(accum):
            batch = next(self.loader)
            self._account_bad(batch)
            if len(batch.labels) == 0:
                raise DataError(f"{self.data_path}: a whole batch failed to decode; the data is unusable")
            out = self._micro_step(batch, sync=micro == accum - 1, scale=1.0 / accum)
            n_images += len(batch.labels)
            for k, v in out.items():
                if k not in ("embeddings", "norms") and v.ndim == 0:
                    sums[k] = sums[k] + v.detach().float() / accum
            norms.append(out["norms"])

        # one all-reduce: every rank logs the global batch's means, and all agree on a non-finite loss
        keys = sorted(sums)
        norm_all = torch.cat(norms).float()
        logged = torch.stack([*(sums[k] for k in keys), norm_all.sum(), norm_all.new_tensor(norm_all.numel())])
        tdist.all_reduce_sum_(logged)
        logged[: len(keys)] /= self.world.world_size
        finite = bool(torch.isfinite(logged[keys.index("loss")]).item())
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite()
            return {"lr": lr, "loss": float("nan"), "skipped": 1.0}

        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else math.inf
        if self.sharded_head is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], max_norm
            )
        else:  # the norm over every rank's centres, so all ranks clip alike
            grad_norm = clip_grad_norm_sharded(
                self.model.parameters(), self.sharded_head.parameters(), max_norm, self.sharded_head.group
            )
        # (float16: GradScaler skips a step on the ranks that saw an inf. The backbone's gradients are
        # all-reduced, so all see the same; the centres' float32 gradients of a finite loss stay finite.)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

        values: dict[str, Any] = dict(zip(keys, logged[: len(keys)]))
        values.update(lr=lr, grad_norm=grad_norm, norm_mean=logged[-2] / logged[-1], images=float(n_images))
        return values

    def _nonfinite(self) -> None:
        self.counters["nonfinite"] += 1
        where = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint yet"
        if self.cfg.nonfinite == "stop" or self.counters["nonfinite"] > self.cfg.max_nonfinite:
            raise TimmfaceError(
                f"non-finite loss at step {self.step + 1} ({self.counters['nonfinite']} so far; nonfinite="
                f"{self.cfg.nonfinite}, max_nonfinite={self.cfg.max_nonfinite}); {where}"
            )
        if self.is_main:
            print(f"warning: non-finite loss at step {self.step + 1}: step skipped", flush=True)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def fit(self, until: int | None = None) -> dict[str, float]:
        """Train to ``total_steps``; evaluate every ``eval_every`` and save every ``save_every`` steps.

        ``until`` stops this call early at that step, after saving a checkpoint there (a job with a
        time limit; tests of resume). The schedule still follows ``total_steps``.
        """
        cfg = self.cfg
        stop = cfg.total_steps if until is None else min(until, cfg.total_steps)
        progress = Progress(cfg.total_steps, self.step, cfg.log.progress, enabled=self.is_main)
        self._fit_t0 = time.perf_counter()
        if self.is_main:
            progress.message(self.describe())
        self.model.train()
        window_time, window_images = 0.0, 0.0  # training time only: evaluation and saving left out
        acc: dict[str, float] = defaultdict(float)
        acc_n = 0
        try:
            while self.step < stop:
                t0 = time.perf_counter()
                values = self.train_step()
                self.step += 1
                fault("train.step", step=self.step)  # test-only (timmface/faults.py)
                if self.ema is not None:
                    self.ema.update(self.model.backbone, self.step)
                window_time += time.perf_counter() - t0
                window_images += values.pop("images", 0.0)
                for k, v in values.items():
                    acc[k] += float(v)
                acc_n += 1
                log_now = self.step % cfg.log.every == 0 or self.step == cfg.total_steps
                if log_now:
                    record = {k: v / acc_n for k, v in acc.items()}
                    record["img_per_s"] = window_images * self.world.world_size / max(window_time, 1e-9)
                    record["elapsed_s"] = self.elapsed()
                    record["epoch"] = self.loader.epoch_progress
                    record["data/bad_records"] = self.counters["bad_records"]
                    record["nonfinite_skipped"] = self.counters["nonfinite"]
                    self.metrics.log(self.step, record)
                    shown = {k: record[k] for k in ("loss", "lr", "img_per_s") if k in record}
                    progress.update(self.step, shown, emit=True)
                    acc, acc_n = defaultdict(float), 0
                    window_time, window_images = 0.0, 0.0
                else:
                    progress.update(self.step, {}, emit=False)
                final = self.step == cfg.total_steps
                if self._due(cfg.eval_every) or final:
                    results = self.evaluate()
                    if results and self.is_main:
                        progress.message(
                            f"step {self.step}: " + "  ".join(f"{k}={v:.4f}" for k, v in results.items() if "/" in k)
                        )
                if self._due(cfg.save_every) or final or self.step == stop:
                    self.save()
        except RuntimeError as e:
            if self.world.distributed and tdist.is_peer_failure(e):
                raise TimmfaceError(
                    f"rank {self.world.rank}: another rank stopped answering after step {self.step} (no reply "
                    f"within dist_timeout={cfg.dist_timeout:g} s, or its connection closed); its log says why; "
                    f"resume with resume=auto ({tdist.first_line(e)})"
                ) from None
            raise
        finally:
            progress.close()
            self.loader.close()
            self.metrics.close()
        if self.is_main and self.step == cfg.total_steps:
            self._finish()
        return dict(self.last_eval)

    def elapsed(self) -> float:
        """Wall-clock seconds this run has spent in ``fit``, over all its resumed segments."""
        start = getattr(self, "_fit_t0", None)
        return float(self.counters.get("elapsed_s", 0.0)) + (time.perf_counter() - start if start else 0.0)

    def _finish(self) -> None:
        """Last words of a completed run: the final accuracies and the report plot (when matplotlib is there)."""
        accs = "  ".join(f"{k}={v:.4f}" for k, v in self.last_eval.items() if k.startswith("acc/"))
        print(f"done: step {self.step}{'  ' + accs if accs else ''}  checkpoint {self.last_checkpoint}", flush=True)
        try:
            from timmface.report import write_report

            write_report(self.output_dir)
        except Exception as e:  # a plotting problem must not fail a finished run
            warnings.warn(f"could not write the run report: {e}", stacklevel=2)

    def describe(self) -> str:
        n_backbone = sum(p.numel() for p in self.model.backbone.parameters())
        n_head = self.num_classes * self.cfg.model.embed_dim
        sharded = f", sharded over {self.world.world_size} rank(s)" if self.sharded_head is not None else ""
        return (
            f"timmface: {self.cfg.model.backbone} ({n_backbone / 1e6:.2f}M params) + {self.num_classes} class centres "
            f"({n_head / 1e6:.2f}M{sharded}), {self.cfg.loss.name}, {len(self.dataset)} images, "
            f"batch {self.cfg.batch_size} x {self.world.world_size} rank(s), device {self.device}, "
            f"from step {self.step} to {self.cfg.total_steps}"
        )

    # ------------------------------------------------------------------------------------ evaluation

    def eval_backbone(self) -> nn.Module:
        """The EMA backbone once it is active, else the live one."""
        if self.ema is not None and self.ema.active:
            return self.ema.module
        return self.model.backbone

    def _read_val(self, path: Path) -> tuple[list[bytes], list[bool]]:
        if path not in self._val_cache:
            from timmface.data.bin import read_bin

            self._val_cache[path] = read_bin(path)
        return self._val_cache[path]

    @torch.no_grad()
    def embed_images(self, backbone: nn.Module, images: list[bytes]) -> Tensor:
        """Embeddings ``N x D`` (float32, CPU, in order) of encoded images, on every rank: rank ``r``
        embeds its contiguous slice ``[N r / W, N (r + 1) / W)`` (empty when ``N < W``), then all gather."""
        from timmface.evaluation.verification import _decode_batches

        amp = self.amp_dtype if self.device.type == "cuda" else None
        n, r, w = len(images), self.world.rank, self.world.world_size
        lo, hi = n * r // w, n * (r + 1) // w
        parts = [
            embed_uint8(backbone, b, flip=self.cfg.eval_flip, amp_dtype=amp, channels_last=self.cfg.model.channels_last)
            for b in _decode_batches(images[lo:hi], self.cfg.eval_batch_size, self.cfg.data.image_size)
        ]
        local = torch.cat(parts) if parts else torch.empty(0, self.cfg.model.embed_dim)
        return tdist.all_gather_concat(local.float().to(self.device)).cpu()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracy-Flip on every verification set; images are split across ranks, then gathered."""
        if not self.val_sets:
            return {}
        backbone = self.eval_backbone()
        was_training = backbone.training
        backbone.eval()
        results: dict[str, float] = {}
        try:
            for path in self.val_sets:
                images, issame = self._read_val(path)
                emb = self.embed_images(backbone, images)
                res = verification_metrics(emb[0::2], emb[1::2], issame)
                name = _val_name(path)
                results[f"acc/{name}"] = res.accuracy
                results[f"acc_std/{name}"] = res.std
                results[f"threshold/{name}"] = res.threshold
        finally:
            backbone.train(was_training)
        self.last_eval = results
        self.metrics.log(self.step, results)
        return results


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)  # type: ignore[assignment]
    return d
