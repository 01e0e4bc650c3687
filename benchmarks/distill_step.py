"""What distillation costs per step, measured as ratios in one run.

    python benchmarks/distill_step.py --teacher runs/distill_demo/teacher     # the demo recipe, demo data
    python benchmarks/distill_step.py --teacher TEACHER --config configs/demo_distill.yaml --steps 30

Builds the real trainers on the same data and student (``configs/demo_distill.yaml`` by default: the
harder demo's student with the recommended distillation terms) and times them interleaved, step by
step, the order rotated every round, so that machine drift and the neighbours' load hit all alike:

- plain training step (``Trainer.train_step``, the config's distillation terms ignored);
- cached distillation step (``DistillTrainer`` with ``distill.cache``: a memory-mapped row lookup);
- online distillation step (``DistillTrainer`` with the teacher running on the batch);
- the teacher's bare forward on the same batches.

It prints ``cached/plain`` (target <= 1.05) and ``online/plain`` as medians of the per-round ratios,
``(online - plain) / teacher forward`` (should be ~1: no extra copies, no gradients, no second data
pass), and ``timmface embed --cache`` throughput against the teacher's bare forward throughput over
the same images. :func:`interleaved_times` and :func:`ratio_to` are also what
``benchmarks/distill_demo.py`` uses for its step-cost column.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timmface.config import load_config  # noqa: E402
from timmface.data.batch import normalize_on_device  # noqa: E402
from timmface.distill import DistillTrainer  # noqa: E402
from timmface.trainer import Trainer, demo_data_path  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_times(fns: dict[str, Callable[[], object]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each call of every function, ``warmup + steps`` rounds of one call each, the first
    ``warmup`` rounds dropped. The order rotates every round, so that no function always follows
    the same neighbour (cache state, a worker's prefetch) and drift spreads evenly."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warmup + steps):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t = timed(fns[name])
            if i >= warmup:
                times[name].append(t)
    return times


def ratio_to(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``time[name] / time[base]`` within the same round (robust to drift between rounds)."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def bench_overrides(data: str, steps: int, out: Path) -> list[str]:
    """Overrides that turn a demo config into a timing harness: fixed data folder, no evaluation or saving."""
    return [
        f"data.path={data}",
        "data.demo.enabled=false",
        "eval_every=0",
        "save_every=0",
        "log.progress=off",
        "overwrite=true",
        f"total_steps={steps + 1}",
        f"output_dir={out}",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="teacher run dir / checkpoint / hub folder")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo_distill.yaml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--embed-images", type=int, default=2000)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="distill_step_"))
    base = load_config(args.config, args.overrides)
    data = base.data.path or demo_data_path(base.data.demo)
    cache = tmp / "teacher.tfemb"

    from timmface.cli import main as cli

    size = str(base.data.image_size)
    t_embed = timed(
        lambda: cli(["embed", "--model", args.teacher, "--data", data, "--out", str(cache), "--cache"]
                    + ["--image-size", size, "--no-progress", "--workers", str(base.data.num_workers)])
    )  # fmt: skip

    def make(cls: type[Trainer], name: str, *extra: str) -> Trainer:
        common = bench_overrides(data, args.steps + args.warmup, tmp / name)
        return cls(load_config(args.config, [*args.overrides, *common, *extra]))

    plain = make(Trainer, "plain")
    online = make(DistillTrainer, "online", f"distill.teacher={args.teacher}")
    cached = make(DistillTrainer, "cached", f"distill.cache={cache}")
    for t in (plain, online, cached):
        t.model.train()
    teacher = online.teacher
    batch = next(plain.loader)  # a batch for the bare teacher forward, from the same loader type
    x = normalize_on_device(batch.images, batch.flips)

    @torch.no_grad()
    def bare() -> None:
        teacher(x)

    times = interleaved_times(
        {"plain": plain.train_step, "cached": cached.train_step, "online": online.train_step, "teacher": bare},
        args.steps,
        args.warmup,
    )
    med = {k: statistics.median(v) for k, v in times.items()}

    # embed throughput vs the teacher's bare forward throughput on the same number of images
    from timmface.embedding.cache import EmbeddingCache

    n_images = EmbeddingCache.open(cache).num_records
    n_fwd = min(args.embed_images, n_images)
    batch_size = 256
    imgs = torch.stack([plain.dataset[i][0] for i in range(min(batch_size, n_images))])
    if imgs.shape[-1] != base.data.image_size:
        from timmface.data.image import resize_uint8

        imgs = torch.stack([resize_uint8(im, base.data.image_size) for im in imgs])
    xb = normalize_on_device(imgs, None)
    with torch.no_grad():
        teacher(xb[:8])
        t_bare = timed(lambda: [teacher(xb) for _ in range(max(1, n_fwd // len(xb)))]) / max(1, n_fwd // len(xb))
    bare_rate = len(xb) / t_bare
    embed_rate = 2 * n_images / t_embed  # two views per record

    terms = ", ".join(cached.model.terms.keys()) or "none"
    print(f"student {base.model.backbone}, batch {base.batch_size}, {base.data.image_size} px, terms: {terms}, "
          f"centres={base.distill.centres}; teacher {args.teacher} ({base.distill.teacher_dtype} online); "
          f"medians of {args.steps} interleaved rounds")  # fmt: skip
    for k in ("plain", "cached", "online", "teacher"):
        print(f"  {k:8s} {med[k] * 1000:8.1f} ms")
    print(f"cached/plain = {ratio_to(times, 'cached', 'plain'):.3f}   (target <= 1.05)")
    print(f"online/plain = {ratio_to(times, 'online', 'plain'):.3f}")
    extra = med["online"] - med["plain"]
    print(f"online - plain = {extra * 1000:.1f} ms; teacher forward = {med['teacher'] * 1000:.1f} ms; "
          f"ratio {extra / med['teacher']:.2f}")  # fmt: skip
    print(f"embed --cache: {embed_rate:.0f} img/s (2 views x {n_images} records, decode + write included); "
          f"bare teacher forward: {bare_rate:.0f} img/s; ratio {embed_rate / bare_rate:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
