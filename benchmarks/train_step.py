"""Time one training step and the training data pipeline, on this machine, in one run.

    python benchmarks/train_step.py                      # CPU defaults: batch 32, 10k classes
    python benchmarks/train_step.py --backbone vit_tiny_patch16_224 --kwargs '{"patch_size": 8, "img_size": 112}'

Prints seconds per optimiser step (fp32 and bf16 autocast) of the real ``FaceModel`` (backbone,
class centres, margin loss, AdamW), the loader's images/s over a RecordIO set it writes itself,
and the raw JPEG-decode rate of the same files as the reference (the data figures come from
``benchmarks/data_pipeline.py``, which also times the seed's pipeline and the index load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data_pipeline import decode_rate, timmface_rate, write_jpeg_recordio  # noqa: E402
from students import create_student  # noqa: E402
from timmface.losses import build_loss  # noqa: E402
from timmface.model import FaceModel, MarginHead  # noqa: E402


def time_steps(
    model: FaceModel,
    opt: torch.optim.Optimizer,
    batch: int,
    classes: int,
    amp: torch.dtype | None,
    steps: int,
    warmup: int = 2,
) -> float:
    x = torch.randn(batch, 3, 112, 112)
    y = torch.randint(0, classes, (batch,))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x, y)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="convnext_atto")
    p.add_argument("--kwargs", default='{"patch_size": 2}', type=json.loads)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--loss", default="cosface")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = FaceModel(
        create_student(args.backbone, **args.kwargs), MarginHead(args.classes, 512, build_loss(args.loss))
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fp32 = time_steps(model, opt, args.batch, args.classes, None, args.steps)
    bf16 = time_steps(model, opt, args.batch, args.classes, torch.bfloat16, args.steps)
    print(
        f"train step {args.backbone} batch {args.batch}, {args.classes} classes: "
        f"fp32 {fp32:.3f} s ({args.batch / fp32:.1f} img/s), bf16 {bf16:.3f} s ({args.batch / bf16:.1f} img/s)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        data = write_jpeg_recordio(Path(tmp) / "rec", args.images)
        raw = decode_rate(data, args.images)
        rate = timmface_rate(data, 128, args.workers, max(3, args.images // 128 - 1))  # per worker
        print(
            f"data: raw JPEG decode {raw:.0f} img/s; loader with {args.workers} worker(s) {rate:.0f} img/s "
            f"per worker ({rate / raw:.2f} of raw decode); benchmarks/data_pipeline.py compares more"
        )


if __name__ == "__main__":
    main()
