"""Training throughput and peak memory on one GPU: the students of the recipes, plain and with an online teacher.

    python benchmarks/gpu_throughput.py                     # on a GPU machine: batch 768, bf16, torch.compile
    python benchmarks/gpu_throughput.py --teacher iresnet100 --steps 30
    python benchmarks/gpu_throughput.py --cpu-smoke         # seconds on a CPU: catches errors, measures nothing
    python benchmarks/gpu_throughput.py --e2e               # the real trainer end to end against this ceiling,
                                                            # one table (benchmarks/gpu_e2e.py; ~8 min on an H200)

One line per configuration: images/s of full optimiser steps (forward, margin loss over the class
centres, backward, AdamW) and the peak GPU memory of the timed steps. Students: ViT/Ti-8
(``vit_tiny_patch16_224``, ``patch_size=8, img_size=112``) and ConvNeXt-Atto (``patch_size=2``), each
plain and with a frozen random-weight iResNet teacher run online in bf16 (the cost of distillation
without a cache; its weights do not change the timing). Inputs are synthetic 112x112 batches made on
the device, so the data pipeline is not measured. The head: MS1MV3's 93,431 classes with Partial FC
16,384 (the recipes' setting); the loss CosFace; the distillation term 1 - cos(student, teacher).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from students import create_student  # noqa: E402
from timmface.losses import CosFace  # noqa: E402
from timmface.model import FaceModel, MarginHead  # noqa: E402

STUDENTS: dict[str, tuple[str, dict]] = {
    "vit_ti8": ("vit_tiny_patch16_224", {"patch_size": 8, "img_size": 112}),
    "convnext_atto": ("convnext_atto", {"patch_size": 2}),
}
IRESNET_LAYERS = {"iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}


def _minimal_iresnet(layers: tuple[int, ...]) -> nn.Module:
    """arcface_torch's iResNet shape (pre-activation basic blocks at 64-512 channels, 25088 -> 512),
    for when the ``teachers`` package is not importable: the timing needs the shape only."""

    class Block(nn.Module):
        def __init__(self, cin: int, c: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.BatchNorm2d(cin), nn.Conv2d(cin, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.PReLU(c),
                nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c),
            )  # fmt: skip
            self.down: nn.Module = nn.Identity()
            if stride != 1 or cin != c:
                self.down = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x) + self.down(x)

    stages, cin = [], 64
    for n, c in zip(layers, (64, 128, 256, 512)):
        stages += [Block(cin, c, 2)] + [Block(c, c, 1) for _ in range(n - 1)]
        cin = c
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64), *stages,
        nn.BatchNorm2d(512), nn.Flatten(), nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512),
    )  # fmt: skip


# bf16 autocast, as the trainer on a GPU; --cpu-smoke runs fp32 (a CPU without bf16 units emulates it ~8x slower,
# and the smoke test only checks that every path runs)
LOW: torch.dtype | None = torch.bfloat16


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=LOW or torch.bfloat16, enabled=LOW is not None)


def build_teacher(arch: str, device: torch.device, compile_: bool) -> Callable[[Tensor], Tensor]:
    """A frozen random-weight iResNet: ``N x 3 x 112 x 112`` -> ``N x 512`` float32, bf16 autocast, no grad."""
    try:
        from teachers.iresnet import IResNet

        net: nn.Module = IResNet(IRESNET_LAYERS[arch])
    except ImportError:
        net = _minimal_iresnet(IRESNET_LAYERS[arch])
    net = net.to(device).eval().requires_grad_(False)
    try:  # the trainer's way of running a teacher, when the package has it
        from teachers import TeacherWrapper

        # as a distillation run has it: channels-last on CUDA, bf16 trunk + fp32 head (teachers.online_teacher)
        low = "float32" if LOW is None else str(LOW).removeprefix("torch.")
        return TeacherWrapper(net, dtype=low, channels_last=device.type == "cuda", compile=compile_)
    except ImportError:
        run = torch.compile(net) if compile_ else net

        def forward(x: Tensor) -> Tensor:
            with torch.no_grad(), _autocast(device):
                return run(x).float()

        return forward


def measure(
    student: str, teacher: str, device: torch.device, batch: int, steps: int, warmup: int, classes: int,
    partial_fc: float, compile_: bool,
) -> dict[str, float]:  # fmt: skip
    """Seconds per optimiser step (the mean over ``steps`` after ``warmup`` untimed ones), img/s, peak GiB."""
    from timmface.runtime import compile_module

    name, kwargs = STUDENTS[student]
    backbone = create_student(name, embed_dim=512, **kwargs)
    model = FaceModel(backbone, MarginHead(classes, 512, CosFace(), partial_fc=partial_fc)).to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if compile_:
        compile_module(model.backbone, fullgraph=True, name=name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    teach = build_teacher(teacher, device, compile_) if teacher != "none" else None
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, 3, 112, 112, device=device, generator=g).mul_(2).sub_(1)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device, generator=g)

    def step() -> None:
        with _autocast(device):
            out = model(x, y)
            loss = out["loss"]
            if teach is not None:
                target = teach(x)
                loss = loss + (1 - F.cosine_similarity(out["embeddings"].float(), target, dim=1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):  # includes compilation
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return {"step_s": elapsed / steps, "img_per_s": batch * steps / elapsed, "peak_gib": peak}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--e2e" in argv:  # the end-to-end table: benchmarks/gpu_e2e.py takes the other arguments
        from gpu_e2e import main as e2e

        return e2e([a for a in argv if a != "--e2e"])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument("--teacher", default="iresnet50", choices=list(IRESNET_LAYERS), help="the online teacher")
    p.add_argument("--batch", type=int, default=768)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--classes", type=int, default=93_431)
    p.add_argument("--partial-fc", type=float, default=16_384)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true", help="CPU, batch 2, one step, 100 classes, no compile")
    args = p.parse_args(argv)
    global LOW
    if args.cpu_smoke:
        device, LOW = torch.device("cpu"), None
        args.batch, args.steps, args.warmup, args.classes, args.partial_fc = 2, 1, 0, 100, 0.5
        args.no_compile = True
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        p.error("no CUDA device: this benchmark is for a GPU machine (use --cpu-smoke to check it runs)")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test: not a measurement)"
    precision = "fp32" if LOW is None else "bf16 autocast"
    print(f"# torch {torch.__version__}, {where}, {precision}, compile={not args.no_compile}, "
          f"{args.classes} classes, partial_fc={args.partial_fc:g}", flush=True)  # fmt: skip
    for student in args.students:
        for teacher in ("none", args.teacher):
            try:
                r = measure(student, teacher, device, args.batch, args.steps, args.warmup, args.classes,
                            args.partial_fc, not args.no_compile)  # fmt: skip
                shown = f"img/s={r['img_per_s']:.0f} step_ms={r['step_s'] * 1e3:.1f} peak_mem_gib={r['peak_gib']:.2f}"
            except torch.OutOfMemoryError:
                shown = "out of memory"
            print(f"{student} teacher={teacher} batch={args.batch} {precision.split()[0]} {shown}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
