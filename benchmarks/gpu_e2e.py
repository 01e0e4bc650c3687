"""End-to-end training throughput on one GPU, in one run: the real trainer against its synthetic ceiling.

    python benchmarks/gpu_throughput.py --e2e                 # on a GPU machine; about 8 minutes
    python benchmarks/gpu_e2e.py --out DIR --budget-s 450     # the same, directly
    python benchmarks/gpu_e2e.py --cpu-smoke --out DIR        # seconds on a CPU: every row runs, nothing is measured

What it does, in this order (a row that would not fit in ``--budget-s`` is listed as skipped):

1. writes a RecordIO set: ``--images`` (30,000) 112x112 procedural faces (``--unique`` distinct JPEGs,
   cycled) with labels spread over ``--classes`` (93,431, MS1MV3's count), and a random-weight
   iResNet-50 ``backbone.pth`` (arcface_torch's layout; the timing needs the shape, not the weights);
2. runs the real ``timmface train`` / ``timmface distill`` CLI, one process per row, on
   ``configs/vit_tiny_cosface.yaml`` (ViT/Ti-8, batch 768, bf16, ``torch.compile``, Partial FC 16,384):
   plain; online distillation with the teacher compiled (``distill.teacher_compile=auto``) and eager;
   cached distillation (after ``timmface embed --cache``, timed too); ``data.decode=gpu``; CPU / GPU /
   ``auto`` decode with 4 workers; plain without Partial FC;
3. the ceilings, on batches made on the device (no loader): the trainer's own model, optimiser and EMA
   in a bare loop (what ``gpu_throughput.py`` measures), plain and with the compiled teacher; and
   ``Trainer.fit`` itself fed device batches (splits the gap into trainer overhead and data pipeline);
4. the teacher's bare forward at the batch size in several layouts and precisions.

img/s of a training run is read from its ``metrics.jsonl``: all log windows after ``--measure-from``
(compilation and worker start-up come before), combined as total images / total time. Results go to
``OUT/gpu_e2e.md`` (the table, with torch version, GPU name and CPU count) and ``OUT/gpu_e2e.json``;
each run's log tail to ``OUT/logs/``. Checkpoints and data stay in ``--work`` (not copied back).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CONFIG = REPO / "configs" / "vit_tiny_cosface.yaml"
AUTO_LINE = "data.decode=auto:"  # the trainer's line saying which decoder auto kept


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything a run depends on; ``--cpu-smoke`` swaps in tiny values."""

    device: str = "cuda"
    config: str = str(CONFIG)
    model: list[str] = field(default_factory=list)
    """Extra overrides for the student (the smoke run swaps in a tiny one)."""
    images: int = 30_000
    unique: int = 1_000
    classes: int = 93_431
    image_size: int = 112
    batch: int = 768
    workers: int = 12
    few_workers: int = 4
    steps: int = 160
    log_every: int = 20
    measure_from: int = 60
    teacher_depth: str = "iresnet50"
    teacher_dtype: str = "bfloat16"
    bare_iters: int = 20
    bare_batch: int = 0
    """Batch of the bare teacher forward (0: the training batch)."""
    synthetic_steps: int = 60
    synthetic_warmup: int = 15
    compile: bool = True
    amp: str = "bfloat16"
    in_process: bool = False
    run_timeout_s: float = 200.0

    def train_overrides(self, data: Path, out: Path) -> list[str]:
        return [
            f"data.path={data}", f"output_dir={out}", "overwrite=true", f"batch_size={self.batch}",
            f"total_steps={self.steps}", f"log.every={self.log_every}", "eval_every=0", "save_every=0",
            "log.progress=plain", f"data.num_workers={self.workers}", f"amp={self.amp}",
            f"compile={str(self.compile).lower()}", f"device={self.device}", *self.model,
        ]  # fmt: skip


def smoke_settings() -> Settings:
    return Settings(
        device="cpu",
        model=["model.backbone=test_vit", "model.kwargs={img_size: 32}", "model.embed_dim=32", "data.image_size=32"],
        images=16, unique=8, classes=40, image_size=32, batch=4, workers=0, few_workers=0, steps=2, log_every=1,
        measure_from=1, teacher_depth="iresnet18", teacher_dtype="float32", bare_iters=1, bare_batch=2,
        synthetic_steps=2, synthetic_warmup=1, compile=False, amp="none", in_process=True, run_timeout_s=300.0,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Inputs: the RecordIO set and the teacher file
# --------------------------------------------------------------------------------------------------


def make_dataset(root: Path, s: Settings) -> Path:
    """``s.images`` records (``s.unique`` distinct procedural faces, cycled), labels grouped and spread
    over ``s.classes`` classes. Reused when it exists with the same parameters."""
    from timmface.data.demo import generate_demo_dataset
    from timmface.data.recordio import RecordIODataset, RecordIOWriter

    key = f"{s.images}-{s.unique}-{s.classes}-{s.image_size}"
    data = root / f"rec-{key}"
    if (data / "train.idx").is_file():
        return data
    per_id = min(20, max(1, s.unique // 2))
    faces = generate_demo_dataset(
        root / f"faces-{s.unique}-{s.image_size}", num_identities=max(2, s.unique // per_id),
        images_per_identity=per_id, num_val_identities=2, num_val_pairs=2, image_size=s.image_size, overwrite=True,
    )  # fmt: skip
    src = RecordIODataset(str(faces))
    jpegs = [src.read_raw(i)[0] for i in range(len(src))]
    with RecordIOWriter(data, num_classes=s.classes, image_size=(s.image_size, s.image_size)) as w:
        for i in range(s.images):
            w.add(jpegs[i % len(jpegs)], i * s.classes // s.images)  # grouped by label, spread over all classes
    return data


def make_teacher(root: Path, depth: str) -> Path:
    """A random-weight arcface_torch iResNet ``backbone.pth`` (plain state dict, published key names)."""
    from teachers.iresnet import IRESNET_LAYERS, IResNet

    path = root / f"{depth}_random" / "backbone.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(IResNet(IRESNET_LAYERS[depth]).state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------------
# Running the CLI and reading its metrics
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    what: str
    img_per_s: float = math.nan
    step_ms: float = math.nan
    seconds: float = math.nan
    status: str = "ok"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_cli(argv: list[str], log: Path, timeout: float, in_process: bool) -> tuple[int, str]:
    """``timmface ARGV``: in a fresh process (a GPU run: clean memory, no leftover compiled state), or in
    this one (the CPU smoke run). Returns the exit status and the combined output; the output is saved."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if in_process:
        from timmface.cli import main

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = int(e.code or 0)
        text = buf.getvalue()
    else:
        try:
            p = subprocess.run(
                [sys.executable, "-m", "timmface.cli", *argv], cwd=REPO, env=_env(), capture_output=True,
                text=True, timeout=timeout,
            )  # fmt: skip
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, text = 124, out + f"\n(timed out after {timeout:.0f} s)"
    log.write_text(text)
    return rc, text


def run_worker(kind: str, params: dict[str, Any], log: Path, timeout: float, in_process: bool) -> dict[str, Any]:
    """One of this file's measurement functions (``WORKERS``), in a fresh process unless ``in_process``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if in_process:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            result = WORKERS[kind](params)
        log.write_text(buf.getvalue() + json.dumps(result))
        return result
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--params", json.dumps(params)]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.write_text(f"(timed out after {timeout:.0f} s)")
        return {"error": f"timed out after {timeout:.0f} s"}
    log.write_text(p.stdout + p.stderr)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"error": f"exit {p.returncode}: {tail}"}
    return json.loads(lines[-1])


def throughput(run_dir: Path, batch: int, measure_from: int) -> tuple[float, int]:
    """img/s over the log windows that start at or after step ``measure_from``: total images / total time
    (each window's time is its images / its ``img_per_s``). Returns ``(img/s, steps measured)``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in records if "img_per_s" in r]
    images = seconds = 0.0
    steps = 0
    previous = 0
    for r in windows:
        step, n = int(r["step"]), int(r["step"]) - previous
        previous = step
        if step - n >= measure_from and r["img_per_s"] > 0:
            images += n * batch
            seconds += n * batch / r["img_per_s"]
            steps += n
    return (images / seconds if seconds > 0 else math.nan), steps


def _tail(text: str, n: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-300:]


# --------------------------------------------------------------------------------------------------
# Measurement functions (run in their own process on a GPU)
# --------------------------------------------------------------------------------------------------


def _trainer(params: dict[str, Any]) -> Any:
    """The real (Distill)Trainer built from the same config and overrides as a CLI run."""
    from timmface.config import load_config

    cfg = load_config(params["config"], params["overrides"])
    if cfg.distill.teacher or cfg.distill.cache:
        from timmface.distill import DistillTrainer

        return DistillTrainer(cfg)
    from timmface.trainer import Trainer

    return Trainer(cfg)


def _device_batch(trainer: Any, batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(trainer.device)
    labels = torch.randint(0, trainer.num_classes, (batch,), generator=g)
    return images, labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_loop(params: dict[str, Any]) -> dict[str, Any]:
    """The ceiling: the trainer's model (compiled as configured), optimiser, clipping and EMA, stepped in a
    bare loop on one batch made on the device -- no loader, no logging, no host reads. With a teacher in
    the config, its compiled forward and the distillation terms are in the step too."""
    import torch.nn.utils as nn_utils

    t = _trainer(params)
    images, labels = _device_batch(t, params["batch"], params["image_size"])
    from timmface.data.batch import normalize_on_device

    labels = labels.to(t.device)
    fmt = torch.channels_last if t.cfg.model.channels_last else torch.contiguous_format
    x = normalize_on_device(images, None, memory_format=fmt)
    teacher = getattr(t, "teacher", None)
    clip = t.cfg.optim.clip_grad_norm
    params_list = [p for p in t.model.parameters() if p.requires_grad]

    def step(i: int) -> None:
        targets = {"teacher": teacher(x)} if teacher is not None else {}
        with t.autocast():
            out = t.ddp_model(x, labels, targets)
        out["loss"].backward()
        if clip > 0:
            nn_utils.clip_grad_norm_(params_list, clip)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        if t.ema is not None:
            t.ema.update(t.model.backbone, i + 1)

    t.model.train()
    for i in range(params["warmup"]):
        step(i)
    _sync(t.device)
    if t.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(t.device)
    t0 = time.perf_counter()
    for i in range(params["steps"]):
        step(params["warmup"] + i)
    _sync(t.device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(t.device) / 2**30 if t.device.type == "cuda" else math.nan
    t.loader.close()
    steps = params["steps"]
    return {"img_per_s": params["batch"] * steps / dt, "step_ms": dt / steps * 1e3, "peak_gib": peak}


class DeviceBatches:
    """A stand-in for the trainer's loader: the same uint8 batch, already on the device, every step."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from timmface.data.batch import Batch

        n = len(labels)
        self.batch = Batch(images, labels, torch.arange(n), torch.zeros(n, dtype=torch.bool))
        self.steps = 0

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> Any:
        self.steps += 1
        return self.batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "batch": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def epoch_progress(self) -> float:
        return 0.0


def synthetic_trainer(params: dict[str, Any]) -> dict[str, Any]:
    """``Trainer.fit`` exactly as a run calls it, fed device batches: its img/s minus the ceiling's is the
    trainer's own overhead; the real run's img/s below this is what the data pipeline costs."""
    t = _trainer(params)
    t.loader.close()
    t.loader = DeviceBatches(*_device_batch(t, params["batch"], params["image_size"]))
    t.fit()
    img_s, steps = throughput(Path(t.cfg.output_dir), params["batch"], params["measure_from"])
    return {"img_per_s": img_s, "step_ms": params["batch"] / img_s * 1e3, "steps": steps}


def bare_teacher(params: dict[str, Any]) -> dict[str, Any]:
    """The teacher's forward alone at the batch size: ms per forward (CUDA events; median of ``iters``)."""
    from teachers import TeacherWrapper, load_teacher

    device = torch.device(params["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch, iters = params["batch"], params["iters"]
    x = torch.rand(batch, 3, params["image_size"], params["image_size"], device=device) * 2 - 1
    out: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[torch.Tensor], torch.Tensor], warmup: int = 1 if iters == 1 else 2) -> None:
        try:
            with torch.no_grad():
                for _ in range(warmup):
                    fn(x)
                _sync(device)
                times = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    fn(x)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
            out[name] = sorted(times)[len(times) // 2] * 1e3
        except Exception as e:  # one layout failing (e.g. out of memory) must not lose the others
            out[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"

    def raw(channels_last: bool, dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
        net = load_teacher(params["teacher"]).to(device).eval()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)

        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return net(x.contiguous(memory_format=fmt)).float()

        return fn

    low = params.get("low", "bfloat16")  # the CPU smoke run: float32 only (CPU bf16 convolutions can be slow)
    for layout in ("NCHW", "channels-last"):
        timed(f"{layout} fp32", raw(layout != "NCHW", None))
        if low == "bfloat16":
            timed(f"{layout} bf16 (all autocast)", raw(layout != "NCHW", torch.bfloat16))
    for compile_ in (False, True) if params.get("compile", True) else (False,):
        module = load_teacher(params["teacher"])
        wrapper = TeacherWrapper(module, dtype=low, channels_last=True, compile=compile_).to(device)
        name = f"TeacherWrapper ({wrapper.describe()})"
        timed(name, wrapper, warmup=5) if compile_ else timed(name, wrapper)
    numbers = [v for v in out.values() if isinstance(v, float)]
    out["best_ms"] = min(numbers) if numbers else math.nan
    return out


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "synthetic_loop": synthetic_loop,
    "synthetic_trainer": synthetic_trainer,
    "bare_teacher": bare_teacher,
}


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


class Bench:
    """Runs the rows in priority order within the time budget and writes the table after each row."""

    def __init__(self, s: Settings, out: Path, work: Path, budget_s: float) -> None:
        self.s, self.out, self.work = s, out, work
        self.deadline = time.monotonic() + budget_s
        self.rows: dict[str, Row] = {}
        self.header: dict[str, Any] = environment(s)
        self.data = self.teacher = self.cache = None  # type: Path | None

    # -- helpers
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, row: Row, need_s: float) -> bool:
        if self.remaining() < need_s:
            row.status, row.note = "skipped", f"not enough of the time budget left ({self.remaining():.0f} s)"
            self.rows[row.name] = row
            self.write()
            return False
        return True

    def timeout(self) -> float:
        return max(10.0, min(self.s.run_timeout_s, self.remaining()))

    def train_row(self, name: str, what: str, command: str, extra: list[str], need_s: float = 40.0) -> Row:
        row = Row(name, what)
        if not self.fits(row, need_s):
            return row
        run_dir = self.work / "runs" / name
        argv = [command, "--config", self.s.config, *self.s.train_overrides(self.data, run_dir), *extra]
        t0 = time.monotonic()
        rc, text = run_cli(argv, self.out / "logs" / f"{name}.log", self.timeout(), self.s.in_process)
        row.seconds = time.monotonic() - t0
        auto = [line for line in text.splitlines() if line.startswith(AUTO_LINE)]
        if auto:
            row.note = auto[-1]
            row.extra["decode_choice"] = auto[-1].rsplit(" ", 1)[-1].strip(".")
        if rc != 0:
            row.status, row.note = "failed", f"exit {rc}: {_tail(text)}"
        else:
            try:
                row.img_per_s, steps = throughput(run_dir, self.s.batch, self.s.measure_from)
                row.step_ms = self.s.batch / row.img_per_s * 1e3
                row.extra["steps_measured"] = steps
            except (OSError, ValueError, ZeroDivisionError) as e:
                row.status, row.note = "failed", f"no metrics: {e}"
        self.rows[name] = row
        self.write()
        return row

    def worker_row(self, name: str, what: str, kind: str, params: dict[str, Any], need_s: float = 40.0) -> Row:
        row = Row(name, what)
        if not self.fits(row, need_s):
            return row
        t0 = time.monotonic()
        result = run_worker(kind, params, self.out / "logs" / f"{name}.log", self.timeout(), self.s.in_process)
        row.seconds = time.monotonic() - t0
        if "error" in result:
            row.status, row.note = "failed", str(result["error"])
        else:
            row.img_per_s = float(result.get("img_per_s", math.nan))
            row.step_ms = float(result.get("step_ms", math.nan))
            row.extra = {k: v for k, v in result.items() if k not in ("img_per_s", "step_ms")}
        self.rows[name] = row
        self.write()
        return row

    def trainer_params(self, name: str, extra: list[str]) -> dict[str, Any]:
        run_dir = self.work / "runs" / name
        return {
            "config": self.s.config, "overrides": [*self.s.train_overrides(self.data, run_dir), *extra],
            "batch": self.s.batch, "image_size": self.s.image_size, "steps": self.s.synthetic_steps,
            "warmup": self.s.synthetic_warmup, "measure_from": self.s.measure_from,
        }  # fmt: skip

    # -- the plan
    def run(self) -> None:
        s = self.s
        t0 = time.monotonic()
        self.data = make_dataset(self.work, s)
        self.teacher = make_teacher(self.work, s.teacher_depth)
        self.header["data_s"] = round(time.monotonic() - t0, 1)
        teacher = [f"distill.teacher={self.teacher}", "model.embed_dim=512", f"distill.teacher_dtype={s.teacher_dtype}"]
        on_gpu = s.device == "cuda"

        ceiling = "synthetic ceiling: the trainer's model/optimiser/EMA in a bare loop, device batches"
        self.worker_row("ceiling", ceiling, "synthetic_loop", self.trainer_params("ceiling", []), 60)
        self.train_row("plain", "timmface train, the recipe (Partial FC 16,384), CPU decode", "train", [])
        self.train_row("online", "timmface distill, online iResNet teacher, teacher_compile=auto", "distill",
                       [*teacher, "distill.teacher_compile=auto"], 60)  # fmt: skip
        self.worker_row("bare_teacher", f"bare {s.teacher_depth} forward, batch {s.batch}", "bare_teacher", {
            "teacher": str(self.teacher), "device": s.device, "batch": s.bare_batch or s.batch, "iters": s.bare_iters,
            "image_size": 112, "compile": s.compile, "low": s.teacher_dtype,
        }, 60)  # fmt: skip
        few = [f"data.num_workers={s.few_workers}"]
        self.train_row("cpu_few", f"data.decode=cpu, {s.few_workers} workers", "train", [*few, "data.decode=cpu"])
        if on_gpu:
            self.train_row("gpu_few", f"data.decode=gpu, {s.few_workers} workers", "train", [*few, "data.decode=gpu"])
        else:
            self.rows["gpu_few"] = Row("gpu_few", "data.decode=gpu", status="n/a", note="no CUDA device")
        self.train_row("auto_few", f"data.decode=auto, {s.few_workers} workers", "train", [*few, "data.decode=auto"])
        if on_gpu:
            self.train_row("decode_gpu", f"data.decode=gpu, {s.workers} workers", "train", ["data.decode=gpu"])
        else:
            self.rows["decode_gpu"] = Row("decode_gpu", "data.decode=gpu", status="n/a", note="no CUDA device")
        self.worker_row("trainer_synthetic", "Trainer.fit on device batches (no loader)", "synthetic_trainer",
                        {**self.trainer_params("trainer_synthetic", []), "steps": s.steps})  # fmt: skip
        self.cache_rows(teacher)
        self.train_row("online_eager", "timmface distill, online, teacher_compile=false", "distill",
                       [*teacher, "distill.teacher_compile=false"])  # fmt: skip
        online = self.trainer_params("ceiling_teacher", [*teacher, "distill.teacher_compile=auto"])
        self.worker_row("ceiling_teacher", "synthetic ceiling with the online teacher", "synthetic_loop", online, 60)
        self.train_row("plain_nopfc", "timmface train, head.partial_fc=0", "train", ["head.partial_fc=0"])
        self.write()

    def cache_rows(self, teacher: list[str]) -> None:
        s = self.s
        row = Row("embed_cache", "timmface embed --cache (both views of every record)")
        if self.fits(row, 40):
            cache = self.work / "cache.tfemb"
            argv = ["embed", "--model", str(self.teacher), "--data", str(self.data), "--out", str(cache), "--cache",
                    "--overwrite", "--batch-size", str(s.batch), "--workers", str(s.workers), "--device", s.device,
                    "--image-size", str(s.image_size),
                    "--amp", "bfloat16" if s.device == "cuda" else "none", "--no-progress"]  # fmt: skip
            t0 = time.monotonic()
            rc, text = run_cli(argv, self.out / "logs" / "embed_cache.log", self.timeout(), s.in_process)
            row.seconds = time.monotonic() - t0
            if rc == 0:
                row.img_per_s = 2 * s.images / row.seconds
                row.note = "2 views per record; process start-up and data reading included"
                self.cache = cache
            else:
                row.status, row.note = "failed", f"exit {rc}: {_tail(text)}"
            self.rows[row.name] = row
            self.write()
        if self.cache is None:
            self.rows["cached"] = Row("cached", "timmface distill from the cache", status="skipped", note="no cache")
            return
        self.train_row("cached", "timmface distill from the cache", "distill",
                       ["model.embed_dim=512", f"distill.cache={self.cache}"])  # fmt: skip

    # -- output
    def targets(self) -> list[tuple[str, str, str]]:
        """``(target, measured, verdict)`` for the issue's acceptance numbers."""
        r = self.rows

        def ok(name: str) -> bool:
            return name in r and r[name].status == "ok" and math.isfinite(r[name].img_per_s)

        out = []
        smoke = self.s.device != "cuda"

        def _verdict(passed: bool) -> str:
            return "smoke run: not a measurement" if smoke else ("met" if passed else "NOT met")

        if ok("plain") and ok("ceiling"):
            ratio = r["plain"].img_per_s / r["ceiling"].img_per_s
            out.append(("end-to-end >= 0.90 x the ceiling", f"{ratio:.3f}", _verdict(ratio >= 0.90)))
        if ok("online") and ok("plain"):
            ratio = r["online"].img_per_s / r["plain"].img_per_s
            out.append(("online >= 0.75 x plain", f"{ratio:.3f}", _verdict(ratio >= 0.75)))
        best = r["bare_teacher"].extra.get("best_ms") if "bare_teacher" in r else None
        if ok("online") and ok("plain") and isinstance(best, float) and math.isfinite(best):
            cost = (r["online"].step_ms - r["plain"].step_ms) / best
            out.append(("(online step - plain step) <= 1.2 x best bare teacher forward", f"{cost:.2f}x",
                        _verdict(cost <= 1.2)))  # fmt: skip
        if ok("gpu_few") and ok("cpu_few"):
            ratio = r["gpu_few"].img_per_s / r["cpu_few"].img_per_s
            choice = r["auto_few"].extra.get("decode_choice", "?") if "auto_few" in r else "?"
            faster = "gpu" if ratio > 1 else "cpu"
            out.append((f"decode=gpu >= decode=cpu at {self.s.few_workers} workers, or auto picks the faster",
                        f"gpu/cpu {ratio:.3f}; auto chose {choice}",
                        _verdict(ratio >= 1.0 or choice == faster)))  # fmt: skip
        return out

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        plain = self.rows.get("plain")
        base = plain.img_per_s if plain is not None and plain.status == "ok" else math.nan
        lines = [
            "# timmface end-to-end GPU throughput (`benchmarks/gpu_e2e.py`)",
            "",
            *(f"- {k}: {v}" for k, v in self.header.items()),
            "",
            "| row | run | img/s | step ms | x plain | wall s | status | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in self.rows.values():
            rel = row.img_per_s / base if math.isfinite(base) and math.isfinite(row.img_per_s) else math.nan
            lines.append(
                f"| {row.name} | {row.what} | {_num(row.img_per_s, 0)} | {_num(row.step_ms, 1)} | {_num(rel, 3)} | "
                f"{_num(row.seconds, 0)} | {row.status} | {row.note.replace('|', '/')} |"
            )
        bare = self.rows.get("bare_teacher")
        if bare is not None and bare.extra:
            lines += ["", "Bare teacher forward, ms (median):", "", "| layout / precision | ms |", "|---|---|"]
            lines += [f"| {k} | {_num(v, 1) if isinstance(v, float) else v} |" for k, v in bare.extra.items()]
        lines += ["", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.targets()]
        (self.out / "gpu_e2e.md").write_text("\n".join(lines) + "\n")
        payload = {"header": self.header, "rows": [asdict(r) for r in self.rows.values()], "targets": self.targets()}
        (self.out / "gpu_e2e.json").write_text(json.dumps(payload, indent=1, default=str))


def _num(x: float, digits: int) -> str:
    return f"{x:,.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def environment(s: Settings) -> dict[str, Any]:
    import timm
    import torchvision

    gpu = torch.cuda.get_device_name(0) if s.device == "cuda" and torch.cuda.is_available() else "none (CPU smoke run)"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
        "cuda": torch.version.cuda or "-", "gpu": gpu, "cpus": f"{os.cpu_count()} ({usable} usable)",
        "python": platform.python_version(),
        "setup": f"{Path(s.config).name} {' '.join(s.model)} batch {s.batch}, amp={s.amp}, compile={s.compile}, "
                 f"{s.images} images ({s.unique} distinct), {s.classes} classes, {s.workers} workers, "
                 f"{s.steps} steps, img/s from step {s.measure_from}, teacher {s.teacher_depth} (random weights)",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_e2e_out"), help="where the table goes ($OUT)")
    p.add_argument("--work", default=None, help="data, teacher, runs (default: /tmp/timmface_gpu_e2e)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip rows that would start after this")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU, in this process: checks, not numbers")
    p.add_argument("--workers", type=int, default=None, help="data workers (default min(12, CPUs - 2))")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.params)), default=str), flush=True)
        return 0
    if args.cpu_smoke:
        s = smoke_settings()
    elif torch.cuda.is_available():
        s = Settings(workers=max(1, min(12, (os.cpu_count() or 4) - 2)))
    else:
        p.error("no CUDA device: this benchmark is for a GPU machine (use --cpu-smoke to check that it runs)")
    if args.workers is not None:
        s.workers = args.workers
    if args.steps is not None:
        s.steps = args.steps
    work = Path(args.work or "/tmp/timmface_gpu_e2e")
    bench = Bench(s, Path(args.out), work, args.budget_s)
    bench.run()
    print((Path(args.out) / "gpu_e2e.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
