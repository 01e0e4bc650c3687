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
import functools
import math
import os
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from timmface import distributed as tdist
from timmface.amp import AMP_DTYPES as AMP_DTYPES  # re-exported: the names amp= takes
from timmface.amp import resolve_amp
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
from timmface.data.gpu_decode import check_gpu_decode, probe_decode, resolve_decode_device
from timmface.data.loader import build_dataset, build_train_loader, dataset_num_classes
from timmface.data.transforms import build_transform
from timmface.ema import EMA
from timmface.errors import CheckpointError, ConfigError, DataError, TimmfaceError
from timmface.evaluation.verification import embed_uint8, verification_metrics
from timmface.faults import fault
from timmface.losses import AdaFace, build_loss
from timmface.metrics import MetricsWriter, Progress
from timmface.model import FaceModel, MarginHead, head_extra_loss
from timmface.optim import build_optimizer, cosine_lr, set_lr, warmup_steps
from timmface.partial_fc import ShardedMarginHead, clip_grad_norm_sharded, scale_grad
from timmface.runtime import compile_module, pick_device, rng_state, seed_everything, set_rng_state
from timmface.stopping import Interrupted, StopRequest
from timmface.sync_free import NonfiniteFlags, StepMeter, can_skip_on_device, step_unless

MODEL_KEYS = ("model.backbone", "model.kwargs", "model.embed_dim")


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


@contextlib.contextmanager
def _no_tf32_matmul(device: torch.device) -> Iterator[None]:
    """CUDA matrix products in full fp32 inside the block (training turns TF32 on for speed)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _val_name(path: str | Path) -> str:
    return Path(path).stem


def _recorded_hub_ids(cfg: Config) -> list[str]:
    """The teacher and val sets the run in ``cfg.output_dir`` recorded in its ``config.yaml`` (pinned Hub ids)."""
    import yaml

    try:
        saved = yaml.safe_load((Path(cfg.output_dir) / "config.yaml").read_text(encoding="utf-8"))
        return [str(saved["distill"]["teacher"]), *(str(v) for v in saved["data"]["val_sets"] or [])]
    except (OSError, yaml.YAMLError, KeyError, TypeError):  # no or odd config.yaml: resolve afresh
        return []


def demo_data_path(demo: DemoConfig) -> str:
    """The folder of the built-in demo dataset for these settings, generated (once, cached) if missing."""
    from timmface.cache import cache_root
    from timmface.data.demo import load_or_generate_demo

    cache = demo.cache_dir or str(cache_root())
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

    uses_teacher = False
    """Whether ``distill.teacher`` is loaded (distillation); its Hub id is then pinned with the val sets."""
    SYNC_FREE: bool | None = None
    """Steps that read nothing back from the device (:mod:`timmface.sync_free`); ``None``: on CUDA (where the
    optimiser can skip a step on the device and amp is not float16). Tests set it to run that path on a CPU."""
    FUSED_OPTIMIZER: bool | None = None
    """torch's fused AdamW / SGD; ``None``: on CUDA (one kernel launch for all parameters, and the on-device skip
    the sync-free step needs). On a CPU the foreach kernels stay, whose results the CPU tests pin down."""

    def __init__(self, cfg: Config) -> None:
        if not self.uses_teacher and (cfg.distill.teacher or cfg.distill.cache):
            key = "distill.teacher" if cfg.distill.teacher else "distill.cache"
            raise ConfigError(
                f"{key} is set, but `timmface train` trains without a teacher; run `timmface distill` with the same "
                "config to distil (or remove the setting)"
            )
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
        self.amp_dtype, self.amp_reason = resolve_amp(cfg.amp, self.device)
        if self.amp_dtype is torch.float16 and self.device.type == "cpu":
            warnings.warn("amp=float16 on CPU is slow and rarely useful; consider amp=bfloat16", stacklevel=2)

    def _pin_hub_ids(self) -> None:
        """Resolve the Hub ids of the config (``hf://`` val sets; the teacher when distilling) once, on rank 0
        (which downloads), and keep them pinned to their commit and file (:mod:`timmface.hub`): ``config.yaml``
        and every checkpoint then name exactly these bytes, and a resume uses them again."""
        from timmface import hub

        cfg = self.cfg
        given = [cfg.distill.teacher if self.uses_teacher else "", *cfg.data.val_sets]
        if not any(hub.is_hub_spec(s) for s in given):
            return
        outcome: object = None
        if self.is_main:
            # a resumed run keeps the commits it started with, even if a branch has moved since
            recorded = _recorded_hub_ids(cfg) if cfg.resume == "auto" and list_checkpoints(cfg.output_dir) else []
            try:
                outcome = [hub.pin(hub.resumed_pin(s, recorded) or s) for s in given]
            except TimmfaceError as e:  # every rank stops with the same line
                outcome = e
        outcome = tdist.broadcast_object(outcome)
        if isinstance(outcome, TimmfaceError):
            raise outcome
        pinned: list[str] = outcome  # type: ignore[assignment]
        for old, new in zip(given, pinned):
            if new != old and self.is_main:
                print(f"{old} -> {new}", flush=True)
        distill = replace(cfg.distill, teacher=pinned[0]) if self.uses_teacher else cfg.distill
        self.cfg = replace(cfg, data=replace(cfg.data, val_sets=pinned[1:]), distill=distill)

    def _setup_output(self) -> None:
        self._pin_hub_ids()
        cfg = self.cfg
        self.output_dir = Path(cfg.output_dir)
        # on every rank, before anything is written: an existing file where the folder (or a parent) should be
        blocker = next((p for p in (self.output_dir, *self.output_dir.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise ConfigError(
                f"output_dir={cfg.output_dir}: {blocker} is a file, not a folder; choose another output_dir"
            )
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
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # no permission, a read-only file system
                raise ConfigError(f"output_dir={cfg.output_dir}: cannot create the folder ({e.strerror})") from None
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
        build = functools.partial(
            build_train_loader,
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
            image_size=cfg.data.image_size,
        )
        decode_device = self._decode_device(build, transform)
        self.loader = build(decode_device=decode_device, prefetch_factor=cfg.data.prefetch_factor)
        self.to_device = DeviceNormalizer(self.device, cfg.model.channels_last)
        if cfg.data.val_sets:
            from timmface.hub import data_file

            self.val_sets = [data_file(p)[0] for p in cfg.data.val_sets]  # hf://: its file in the hub cache
            missing = [str(p) for p in self.val_sets if not p.is_file()]
            if missing:
                raise DataError(f"{missing[0]}: verification set not found (data.val_sets)")
        else:
            folder = Path(path)
            self.val_sets = sorted(folder.glob("*.bin")) if folder.is_dir() else []
        self._val_cache: dict[Path, tuple[list[bytes], list[bool]]] = {}

    def _decode_device(self, build: Callable[..., Any], transform: Callable | None) -> torch.device | None:
        """``data.decode``: ``None`` (the workers decode on the CPU) or the device that decodes. ``auto`` on CUDA
        times both loaders (:func:`~timmface.data.gpu_decode.probe_decode`) and keeps the faster; rank 0's
        choice holds for every rank, and a line says what was measured."""
        cfg = self.cfg
        device = resolve_decode_device(cfg.data.decode, self.device)
        auto = cfg.data.decode == "auto"
        if device is None:
            return None
        try:
            check_gpu_decode(device, transform, cfg.data.image_size)
        except ConfigError as e:
            if not auto:
                raise
            if self.is_main:
                print(f"data.decode=auto: GPU decoding is not possible here ({e}): using cpu", flush=True)
            return None
        if not auto:
            return device
        choice, line = probe_decode(build, device, cfg.data.num_workers)
        if self.is_main:
            print(line, flush=True)
        return device if tdist.broadcast_object(choice is not None) else None

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

    def _check_partial_fc(self) -> None:
        """A Partial FC count must hold the classes of the labels one head samples for, or it samples nothing."""
        cfg = self.cfg
        count = cfg.head.partial_fc
        if count < 1:
            return
        micro = cfg.batch_size // cfg.optim.grad_accum  # the global micro-batch: what a sharded head sees
        ranks = 1 if cfg.head.sharded else self.world.world_size
        seen = micro // ranks
        if int(count) < min(seen, self.num_classes):
            where = "all ranks' labels" if cfg.head.sharded else f"one of {ranks} rank(s)"
            raise ConfigError(
                f"head.partial_fc={count:g}: {int(count)} sampled class centres cannot hold the up to {seen} classes "
                f"of a micro-batch ({where}, batch_size {cfg.batch_size}, grad_accum {cfg.optim.grad_accum}); give "
                f"a count of at least {min(seen, self.num_classes)}, or a fraction below 1"
            )

    def _setup_model(self) -> None:
        from students import create_student

        cfg = self.cfg
        self._check_partial_fc()
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
        fused = self.device.type == "cuda" if self.FUSED_OPTIMIZER is None else self.FUSED_OPTIMIZER
        self.optimizer = build_optimizer(params, cfg.optim, fused=fused)
        head = self.margin_head
        # where the class centres' state sits in optimizer.state_dict()["state"] (None: frozen centres)
        self.head_optim_index = next((i for i, p in enumerate(params) if head is not None and p is head.weight), None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        # steps that never wait for the device (timmface/sync_free.py): on CUDA, with an optimiser that skips on
        # the device; amp=float16 keeps GradScaler's own per-step handling
        wanted = self.device.type == "cuda" if self.SYNC_FREE is None else self.SYNC_FREE
        self.sync_free = bool(wanted and can_skip_on_device(self.optimizer) and not self.scaler.is_enabled())
        self._nonfinite_flags = NonfiniteFlags()
        # the learning-rate schedule as a map from steps to positions in a cosine schedule of base_total steps:
        # the identity until a resume changes total_steps (see lr_at, _extend_schedule)
        self.schedule: dict[str, float] = {
            "base_total": cfg.total_steps, "step": 0, "position": 0.0, "total_steps": cfg.total_steps,
        }  # fmt: skip

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
            "schedule": dict(self.schedule),  # how steps map onto the cosine (a resume may have changed it)
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

    def _sync_running_stats(self) -> None:
        """One set of BatchNorm statistics on every rank, the mean over ranks (live backbone and EMA), before an
        evaluation or a checkpoint: the accuracy logged at a step is then that of the model its checkpoint holds.
        Once per step; a no-op for a single process. The statistics do not enter the training forward (BatchNorm
        uses the batch's own there), so losses and resumes are unchanged."""
        if getattr(self, "_stats_synced_at", None) == self.step:
            return
        self._stats_synced_at = self.step
        modules = [self.model.backbone, *([self.ema.module] if self.ema is not None else [])]
        tdist.average_running_stats_(*modules)

    def save(self) -> Path:
        """Every rank writes its rank file (multi-rank or sharded runs), then rank 0 the main file.

        A rank that cannot write (a full disk) stops every rank at once, each naming the file: the ranks
        agree on success with one all-reduce instead of the others waiting ``dist_timeout`` at a barrier.
        The previous checkpoint stays the newest complete one.
        """
        self._nonfinite_flags.resolve(self._nonfinite)  # the counters it saves include every step it holds
        self._sync_running_stats()
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
        self._load_extra_state(ckpt)
        self.step = int(ckpt["step"])
        self.last_checkpoint = path
        if self.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)
        saved_total = int((ckpt.get("config") or {}).get("total_steps") or self.cfg.total_steps)
        self._extend_schedule(ckpt.get("schedule"), saved_total)

    def _load_extra_state(self, ckpt: dict[str, Any]) -> None:
        """Restore what a subclass added to :meth:`state_dict` (e.g. distillation's teacher memory)."""

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
            head_out = self.sharded_head(embeddings, labels, targets.get("teacher"))
            out.update({k: v for k, v in head_out.items() if k != "norms"})  # margin, distillation terms
            extra = head_extra_loss(self.sharded_head, head_out)
            out["loss"] = out["loss"] + self.model.margin_weight * head_out["margin"] + extra
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
        lr = self.lr_at(self.step)
        set_lr(self.optimizer, lr)
        loss_state = self._loss_state()
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
        # (new_full: a fill kernel; new_tensor would copy a host number and wait for the device)
        logged = torch.stack([*(sums[k] for k in keys), norm_all.sum(), norm_all.new_full((), norm_all.numel())])
        tdist.all_reduce_sum_(logged)
        logged[: len(keys)] /= self.world.world_size
        skip = ~torch.isfinite(logged[keys.index("loss")])
        if not self.sync_free and bool(skip.item()):
            self.optimizer.zero_grad(set_to_none=True)
            self._restore_loss_state(loss_state)
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
        if self.sync_free:
            return self._finish_step_on_device(skip, loss_state, keys, logged, grad_norm, lr, n_images)
        # (float16: GradScaler skips a step on the ranks that saw an inf. The backbone's gradients are
        # all-reduced, so all see the same; the centres' float32 gradients of a finite loss stay finite.)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

        values: dict[str, Any] = dict(zip(keys, logged[: len(keys)]))
        values.update(lr=lr, grad_norm=grad_norm, norm_mean=logged[-2] / logged[-1], images=float(n_images))
        return values

    def _finish_step_on_device(
        self,
        skip: Tensor,
        loss_state: list[tuple[Tensor, Tensor]],
        keys: list[str],
        logged: Tensor,
        grad_norm: Tensor,
        lr: float,
        n_images: int,
    ) -> dict[str, Any]:
        """The end of a sync-free step (:mod:`timmface.sync_free`): the update, skipped on the device when the
        loss was non-finite (``skip``, the same on every rank after the all-reduce); the loss statistics put
        back; the flag kept for the next read. The values are those of the per-step check: a skipped step
        logs a NaN loss and ``skipped`` 1, and adds nothing to the other means or to the images counted."""
        step_unless(self.optimizer, skip)
        self.optimizer.zero_grad(set_to_none=True)
        self._restore_loss_state(loss_state, where=skip)
        self._nonfinite_flags.add(self.step + 1, skip)
        zero = logged.new_zeros(())
        values: dict[str, Any] = {k: torch.where(skip, zero, v) for k, v in zip(keys, logged[: len(keys)])}
        values["loss"] = torch.where(skip, zero + math.nan, logged[keys.index("loss")])
        values.update(
            lr=lr,
            grad_norm=torch.where(skip, zero, grad_norm.float()),
            norm_mean=torch.where(skip, zero, logged[-2] / logged[-1]),
            images=torch.where(skip, zero, zero + n_images),
            skipped=skip.float(),
        )
        return values

    def _catch_up(self) -> None:
        """Where the host reads device values anyway (a log line, an evaluation, a checkpoint): count, warn about
        or stop on the non-finite steps flagged since the last time (sync-free steps), and let the device finish
        its queue, so that the log window's time includes the device's work."""
        self._nonfinite_flags.resolve(self._nonfinite)
        if self.sync_free and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lr_at(self, step: int) -> float:
        """The learning rate for step ``step + 1``: warm-up then cosine (:func:`cosine_lr`) over ``base_total``
        steps, reached through the map a resume with another ``total_steps`` set up (the identity otherwise):
        from ``step`` on, positions ``position .. base_total`` are spread evenly over ``step .. total_steps``."""
        cfg, base = self.cfg, int(self.schedule["base_total"])
        warmup = warmup_steps(cfg.optim.warmup, base)
        return cosine_lr(self._position(step), cfg.optim.lr, base, warmup, cfg.optim.final_lr_mult)

    def _extend_schedule(self, saved: dict[str, float] | None, saved_total: int) -> None:
        """A resume whose ``total_steps`` differs from the checkpoint's: map the schedule as
        ``optim.resume_schedule`` says, and say in one line what happens to the learning rate."""
        cfg = self.cfg
        self.schedule = dict(saved) if saved else {
            "base_total": saved_total, "step": 0, "position": 0.0, "total_steps": saved_total,
        }  # fmt: skip
        old_total = int(self.schedule["total_steps"])
        if old_total == cfg.total_steps:
            return
        now = self.lr_at(self.step)
        stretched = {**self.schedule, "step": self.step, "total_steps": cfg.total_steps}
        stretched["position"] = now_pos = self._position(self.step)
        fresh = {"base_total": cfg.total_steps, "step": 0, "position": 0.0, "total_steps": cfg.total_steps}
        self.schedule = fresh
        recomputed = self.lr_at(self.step)
        if cfg.optim.resume_schedule == "continue":
            self.schedule = stretched
            what = (
                f"the rest of the learning-rate schedule (position {now_pos:g} of {int(stretched['base_total'])}) is "
                f"stretched to end at step {cfg.total_steps}, going on from lr {now:.3g} without a jump; "
                f"optim.resume_schedule=recompute would follow a {cfg.total_steps}-step schedule instead "
                f"(lr {recomputed:.3g} at step {self.step})"
            )
        else:
            what = (
                f"the learning rate follows a {cfg.total_steps}-step schedule: {now:.3g} -> {recomputed:.3g} at step "
                f"{self.step}; optim.resume_schedule=continue would go on from {now:.3g} and end at step "
                f"{cfg.total_steps} instead"
            )
        if self.is_main:
            print(
                f"resuming at step {self.step} with total_steps {old_total} -> {cfg.total_steps} "
                f"(optim.resume_schedule={cfg.optim.resume_schedule}): {what}",
                flush=True,
            )

    def _position(self, step: int) -> float:
        """Where step ``step`` sits in the cosine schedule of ``base_total`` steps (see :meth:`lr_at`)."""
        sched = self.schedule
        base, start, position, end = sched["base_total"], sched["step"], sched["position"], sched["total_steps"]
        return position + (base - position) * (step - start) / max(1.0, end - start) if step >= start else step

    def _loss_state(self) -> list[tuple[Tensor, Tensor]]:
        """The margin loss's running statistics (AdaFace's norm mean and std) with a copy, taken before a step:
        a skipped step puts them back (:meth:`_restore_loss_state`), so it leaves no trace."""
        loss = getattr(self.margin_head, "loss", None)
        return [(b, b.detach().clone()) for b in loss.buffers()] if loss is not None else []

    @staticmethod
    def _restore_loss_state(state: list[tuple[Tensor, Tensor]], where: Tensor | None = None) -> None:
        """Put the statistics back; with ``where`` (a 0-d bool tensor) only if it is true, on the device."""
        with torch.no_grad():
            for buffer, saved in state:
                buffer.copy_(saved if where is None else torch.where(where, saved, buffer))

    def _nonfinite(self, step: int | None = None) -> None:
        """Count a non-finite step (``step``, 1-based; default: the one under way); stop past the budget."""
        step = self.step + 1 if step is None else step
        self.counters["nonfinite"] += 1
        where = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint yet"
        if self.cfg.nonfinite == "stop" or self.counters["nonfinite"] > self.cfg.max_nonfinite:
            raise TimmfaceError(
                f"non-finite loss at step {step} ({self.counters['nonfinite']} so far; nonfinite="
                f"{self.cfg.nonfinite}, max_nonfinite={self.cfg.max_nonfinite}); {where}"
            )
        if self.is_main:
            print(f"warning: non-finite loss at step {step}: step skipped", flush=True)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def fit(self, until: int | None = None) -> dict[str, float]:
        """Train to ``total_steps``; evaluate every ``eval_every`` and save every ``save_every`` steps.

        ``until`` stops this call early at that step, after saving a checkpoint there (a job with a
        time limit; tests of resume). The schedule still follows ``total_steps``.
        """
        cfg = self.cfg
        stop = cfg.total_steps if until is None else min(until, cfg.total_steps)
        evals = cfg.eval_every if self.val_sets else None
        progress = Progress(cfg.total_steps, self.step, cfg.log.progress, enabled=self.is_main, eval_every=evals)
        self._fit_t0 = time.perf_counter()
        if self.is_main:
            progress.message(self.describe())
            if evals is not None and progress.mode != "off" and self.step < stop:
                progress.set_eval_estimate(self._estimate_eval_seconds())
        stopper = StopRequest(self.device, self.world.distributed)
        stopper.install()
        self.model.train()
        window_time = 0.0  # training time only: evaluation and saving left out
        meter = StepMeter()  # the window's logged values, summed on the device until a log step reads them
        try:
            while self.step < stop:
                t0 = time.perf_counter()
                values = self.train_step()
                self.step += 1
                fault("train.step", step=self.step)  # test-only (timmface/faults.py)
                if self.ema is not None:
                    self.ema.update(self.model.backbone, self.step)
                meter.add(values)
                log_now = self.step % cfg.log.every == 0 or self.step == cfg.total_steps
                if log_now or self.step == stop or self._due(cfg.eval_every) or self._due(cfg.save_every):
                    self._catch_up()  # the host reads here anyway: flags first, and the device's time in the window
                window_time += time.perf_counter() - t0
                if log_now:
                    record, window_images = meter.read()
                    record["img_per_s"] = window_images * self.world.world_size / max(window_time, 1e-9)
                    record["elapsed_s"] = self.elapsed()
                    record["epoch"] = self.loader.epoch_progress
                    record["data/bad_records"] = self.counters["bad_records"]
                    record["nonfinite_skipped"] = self.counters["nonfinite"]
                    self.metrics.log(self.step, record)
                    shown = {k: record[k] for k in ("loss", "lr", "img_per_s") if k in record}
                    progress.update(self.step, shown, emit=True)
                    window_time = 0.0
                else:
                    progress.update(self.step, {}, emit=False)
                final = self.step == cfg.total_steps
                if self._due(cfg.eval_every) or final:
                    t_eval = time.perf_counter()
                    results = self.evaluate()
                    if results:
                        progress.eval_done(self.step, time.perf_counter() - t_eval)
                    if results and self.is_main:
                        progress.message(
                            f"step {self.step}: " + "  ".join(f"{k}={v:.4f}" for k, v in results.items() if "/" in k)
                        )
                if self._due(cfg.save_every) or final or self.step == stop:
                    self.save()
                if stopper.agreed() and self.step < stop:
                    self._stop_on_signal(stopper)
            stopper.drain()
        except RuntimeError as e:
            if self.world.distributed and tdist.is_peer_failure(e):
                raise TimmfaceError(
                    f"rank {self.world.rank}: another rank stopped answering after step {self.step} (no reply "
                    f"within dist_timeout={cfg.dist_timeout:g} s, or its connection closed); its log says why; "
                    f"resume with resume=auto ({tdist.first_line(e)})"
                ) from None
            raise
        finally:
            stopper.restore()
            progress.close()
            self.loader.close()
            self.metrics.close()
        if self.is_main and self.step == cfg.total_steps:
            self._finish()
        return dict(self.last_eval)

    def _stop_on_signal(self, stopper: StopRequest) -> None:
        """Every rank agreed to stop after this step: save it (unless just saved), say how to go on, raise."""
        stopper.drain()
        if self.last_checkpoint != checkpoint_path(self.output_dir, self.step):
            self._catch_up()  # sync-free steps: their non-finite flags are counted before the checkpoint holds them
            self.save()
        command = "distill" if self.uses_teacher else "train"
        launcher = " (under torchrun or srun, launched as before)" if self.world.distributed else ""
        how = f"timmface {command} --config {self.output_dir / 'config.yaml'} resume=auto{launcher}"
        message = f"stopped at step {self.step} on {stopper.signal_name}: checkpoint {self.last_checkpoint}"
        if self.is_main:
            print(f"{message}\nto continue: {how}", flush=True)
        raise Interrupted(message)

    def _estimate_eval_seconds(self, probe: int = 32) -> float:
        """Seconds one evaluation should take, for the ETA before the first one is timed: embed ``probe`` images
        of the first set twice (the first pass warms up), scaled to every set's images split over the ranks.
        Eval mode, no gradient: no state or random number is touched."""
        images = [self._read_val(p)[0] for p in self.val_sets]
        sample = images[0][:probe]
        if not sample:
            return 0.0
        backbone = self.eval_backbone()
        was_training = backbone.training
        backbone.eval()
        try:
            self._embed_local(backbone, sample)
            t0 = time.perf_counter()
            self._embed_local(backbone, sample)
            per_image = (time.perf_counter() - t0) / len(sample)
        finally:
            backbone.train(was_training)
        return per_image * sum(len(x) for x in images) / self.world.world_size

    def elapsed(self) -> float:
        """Wall-clock seconds this run has spent in ``fit``, over all its resumed segments."""
        start = getattr(self, "_fit_t0", None)
        return float(self.counters.get("elapsed_s", 0.0)) + (time.perf_counter() - start if start else 0.0)

    def _finish(self) -> None:
        """Last words of a completed run: the final accuracies, report.txt and the plot (said once when skipped)."""
        accs = "  ".join(f"{k}={v:.4f}" for k, v in self.last_eval.items() if k.startswith("acc/"))
        print(f"done: step {self.step}{'  ' + accs if accs else ''}  checkpoint {self.last_checkpoint}", flush=True)
        try:
            from timmface.report import write_report

            report = write_report(self.output_dir)
            if report is not None and report.note:
                print(f"note: {report.note}", flush=True)
        except Exception as e:  # a reporting problem must not fail a finished run
            warnings.warn(f"could not write the run report: {e}", stacklevel=2)

    def describe(self) -> str:
        n_backbone = sum(p.numel() for p in self.model.backbone.parameters())
        n_head = self.num_classes * self.cfg.model.embed_dim
        sharded = f", sharded over {self.world.world_size} rank(s)" if self.sharded_head is not None else ""
        return (
            f"timmface: {self.cfg.model.backbone} ({n_backbone / 1e6:.2f}M params) + {self.num_classes} class centres "
            f"({n_head / 1e6:.2f}M{sharded}), {self.cfg.loss.name}, {len(self.dataset)} images, "
            f"batch {self.cfg.batch_size} x {self.world.world_size} rank(s), device {self.device}, "
            f"amp {_dtype_name(self.amp_dtype)} ({self.amp_reason}), from step {self.step} to {self.cfg.total_steps}"
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
        n, r, w = len(images), self.world.rank, self.world.world_size
        local = self._embed_local(backbone, images[n * r // w : n * (r + 1) // w])
        return tdist.all_gather_concat(local.float().to(self.device)).cpu()

    def _embed_local(self, backbone: nn.Module, images: list[bytes]) -> Tensor:
        """Embeddings ``n x D`` of these images on this rank alone (device of the backbone)."""
        from timmface.evaluation.verification import _decode_batches

        amp = AMP_DTYPES[self.cfg.eval_amp]  # not the training amp: fp32 by default, as `timmface eval`
        parts = [
            embed_uint8(backbone, b, flip=self.cfg.eval_flip, amp_dtype=amp, channels_last=self.cfg.model.channels_last)
            for b in _decode_batches(images, self.cfg.eval_batch_size, self.cfg.data.image_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0, self.cfg.model.embed_dim)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracy-Flip on every verification set; images are split across ranks, then gathered."""
        if not self.val_sets:
            return {}
        self._sync_running_stats()
        backbone = self.eval_backbone()
        was_training = backbone.training
        backbone.eval()
        results: dict[str, float] = {}
        try:
            with _no_tf32_matmul(self.device):  # fp32 as `timmface eval` (PyTorch's default), not training's TF32
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
