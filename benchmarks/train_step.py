"""Time one training step and the training data pipeline, on this machine, in one run.

    python benchmarks/train_step.py                      # CPU defaults: convnext_atto, batch 32, 10k classes
    python benchmarks/train_step.py --backbone lcnet_050 --batch 64 --classes 250 --embed-dim 256   # the demo's step
    python benchmarks/train_step.py --backbone vit_tiny_patch16_224 --kwargs '{"patch_size": 8, "img_size": 112}'

Prints seconds per optimiser step in fp32 and under bf16 autocast of the real ``FaceModel`` (backbone,
class centres, margin loss, AdamW), timed alternately step by step so that a machine's changing load
falls on both alike, their ratio, and what ``amp: auto`` picks here (``timmface/amp.py``). Then the
loader's images/s over a RecordIO set it writes itself and the raw JPEG-decode rate of the same files
(``--images 0`` skips that part; ``benchmarks/data_pipeline.py`` also times the seed's pipeline and the
index load).
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
from timmface.amp import resolve_amp  # noqa: E402
from timmface.losses import build_loss  # noqa: E402
from timmface.model import FaceModel, MarginHead  # noqa: E402

# keywords a backbone needs for 112x112 faces when --kwargs is not given (others: timm's defaults)
DEFAULT_KWARGS = {"convnext_atto": {"patch_size": 2}, "convnext_nano": {"patch_size": 2}}


def one_step(model: FaceModel, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None):
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        out = model(x, y)
    out["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def time_steps(
    model: FaceModel, opt: torch.optim.Optimizer, batch: int, classes: int, steps: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per step, fp32 and bf16, interleaved (fp32, bf16, fp32, ...) after ``warmup`` of each."""
    x = torch.randn(batch, 3, 112, 112)
    y = torch.randint(0, classes, (batch,))
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    times: dict[str, list[float]] = {k: [] for k in dtypes}
    for i in range(warmup + steps):
        for name, amp in dtypes.items():
            elapsed = one_step(model, opt, x, y, amp)
            if i >= warmup:
                times[name].append(elapsed)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="convnext_atto")
    p.add_argument("--kwargs", default=None, type=json.loads, help="timm keywords (default: DEFAULT_KWARGS or none)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--loss", default="cosface")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--images", type=int, default=2000, help="images of the loader benchmark (0: skip it)")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    kwargs = args.kwargs if args.kwargs is not None else DEFAULT_KWARGS.get(args.backbone, {})
    backbone = create_student(args.backbone, embed_dim=args.embed_dim, **kwargs)
    model = FaceModel(backbone, MarginHead(args.classes, args.embed_dim, build_loss(args.loss))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = time_steps(model, opt, args.batch, args.classes, args.steps)
    print(
        f"train step {args.backbone} batch {args.batch}, {args.classes} classes: "
        f"fp32 {t['fp32']:.3f} s ({args.batch / t['fp32']:.1f} img/s), "
        f"bf16 {t['bf16']:.3f} s ({args.batch / t['bf16']:.1f} img/s); bf16 / fp32 time {t['bf16'] / t['fp32']:.2f}"
    )
    dtype, why = resolve_amp("auto", torch.device("cpu"))
    print(f"amp=auto here: {'bf16' if dtype is torch.bfloat16 else 'fp32'} ({why})")
    if args.images <= 0:
        return

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
