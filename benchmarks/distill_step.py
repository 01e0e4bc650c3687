"""What distillation costs per step, measured as ratios in one run.

    python benchmarks/distill_step.py --teacher runs/distill_demo/teacher     # demo data, demo student
    python benchmarks/distill_step.py --teacher TEACHER --config configs/demo.yaml --steps 30

Builds the real trainers on the same data and student (``configs/demo.yaml`` by default) and times,
interleaved step by step so that machine drift hits all alike:

- plain training step (``Trainer.train_step``);
- cached distillation step (``DistillTrainer`` with ``distill.cache``: a memory-mapped row lookup);
- online distillation step (``DistillTrainer`` with the teacher running on the batch);
- the teacher's bare forward on the same batches.

It prints ``cached/plain`` (target <= 1.05), ``(online - plain) / teacher forward`` (should be ~1:
no extra copies, no gradients, no second data pass), and ``timmface embed --cache`` throughput
against the teacher's bare forward throughput over the same images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timmface.config import load_config  # noqa: E402
from timmface.data.batch import normalize_on_device  # noqa: E402
from timmface.distill import DistillTrainer  # noqa: E402
from timmface.trainer import Trainer, demo_data_path  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="teacher run dir / checkpoint / hub folder")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--embed-images", type=int, default=2000)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="distill_step_"))
    base = load_config(args.config, args.overrides)
    data = base.data.path or demo_data_path(base.data.demo)
    common = [
        f"data.path={data}",
        "data.demo.enabled=false",
        "eval_every=0",
        "save_every=0",
        "log.progress=off",
        f"total_steps={args.steps + args.warmup + 1}",
        *args.overrides,
    ]
    cache = tmp / "teacher.tfemb"

    from timmface.cli import main as cli

    size = str(base.data.image_size)
    t_embed = timed(
        lambda: cli(["embed", "--model", args.teacher, "--data", data, "--out", str(cache), "--cache"]
                    + ["--image-size", size, "--no-progress", "--workers", str(base.data.num_workers)])
    )  # fmt: skip

    plain = Trainer(load_config(args.config, [*common, f"output_dir={tmp / 'plain'}"]))
    online = DistillTrainer(
        load_config(args.config, [*common, f"output_dir={tmp / 'online'}", f"distill.teacher={args.teacher}",
                                  "distill.teacher_dtype=float32"])
    )  # fmt: skip
    cached = DistillTrainer(
        load_config(args.config, [*common, f"output_dir={tmp / 'cached'}", f"distill.cache={cache}"])
    )
    for t in (plain, online, cached):
        t.model.train()

    times: dict[str, list[float]] = {"plain": [], "cached": [], "online": [], "teacher": []}
    teacher = online.teacher

    @torch.no_grad()
    def bare(x: torch.Tensor) -> torch.Tensor:
        return teacher(x)

    for i in range(args.warmup + args.steps):
        batch = next(plain.loader)  # a batch for the bare teacher forward, from the same loader type
        x = normalize_on_device(batch.images, batch.flips)
        step_times = {
            "plain": timed(plain.train_step),
            "cached": timed(cached.train_step),
            "online": timed(online.train_step),
            "teacher": timed(lambda x=x: bare(x)),
        }
        if i >= args.warmup:
            for k, v in step_times.items():
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}

    # embed throughput vs the teacher's bare forward throughput on the same number of images
    from timmface.embedding.cache import EmbeddingCache

    n_images = EmbeddingCache.open(cache).num_records
    n_fwd = min(args.embed_images, n_images)
    batch_size = 256
    imgs = torch.stack([plain.dataset[i][0] for i in range(min(batch_size, n_images))])
    x = normalize_on_device(imgs, None)
    with torch.no_grad():
        teacher(x[:8])
        t_bare = timed(lambda: [teacher(x) for _ in range(max(1, n_fwd // len(x)))]) / max(1, n_fwd // len(x))
    bare_rate = len(x) / t_bare
    embed_rate = 2 * n_images / t_embed  # two views per record

    print(f"student {base.model.backbone}, batch {base.batch_size}, teacher {args.teacher}; medians of {args.steps}")
    for k in ("plain", "cached", "online", "teacher"):
        print(f"  {k:8s} {med[k] * 1000:8.1f} ms")
    print(f"cached/plain = {med['cached'] / med['plain']:.3f}   (target <= 1.05)")
    extra = med["online"] - med["plain"]
    print(f"online - plain = {extra * 1000:.1f} ms; teacher forward = {med['teacher'] * 1000:.1f} ms; "
          f"ratio {extra / med['teacher']:.2f}")  # fmt: skip
    print(f"embed --cache: {embed_rate:.0f} img/s (2 views x {n_images} records, decode + write included); "
          f"bare teacher forward: {bare_rate:.0f} img/s; ratio {embed_rate / bare_rate:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
