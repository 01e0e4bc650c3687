"""Checks that need a CUDA device (``pytest -m gpu``; skipped without one).

They run on a GPU machine's own torch / torchvision / timm (the lent H200 carries torch 2.11, torchvision
0.26, timm 1.0.29) from the checkout, with nothing installed: ``bash benchmarks/gpu_check.sh`` runs them and
the end-to-end benchmark. Numbers a test measures are printed (``pytest -rP`` shows them), so a GPU session
records what the tolerances were checked against. The CPU side of each path (the precision split, the
sync-free step, the batched decode with a CPU decoder substituted) is tested in the ordinary suite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_run_args, write_toy_dataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 classes x 2 images: enough classes for Partial FC to sample (head.partial_fc=12 < 24)."""
    return write_toy_dataset(tmp_path_factory.mktemp("gpu") / "toy24", num_classes=24, per_class=2)


def _cuda_args(data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_run_args(data, out, "device=cuda", "eval_every=0", "save_every=0", *extra)


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [float(r["loss"]) for r in records if "loss" in r]


def _trainer(args: list[str]) -> Any:
    from timmface.config import load_config
    from timmface.trainer import Trainer

    return Trainer(load_config(None, args))


# --------------------------------------------------------------------------------------------------
# Precision and compilation of the student
# --------------------------------------------------------------------------------------------------


def test_bf16_and_fp32_losses_agree_over_a_few_steps(toy_data: Path, tmp_path: Path) -> None:
    """The same 6 steps (same data, same initial weights) under bf16 autocast and in fp32: the losses agree
    to bf16's precision (cosines and margin loss are fp32 in both; the backbone's activations are bf16 in one).
    Measured on this project's CPU with CPU autocast: step 1 (same weights) differs by 3.6e-4 relative, and the
    six steps by at most 1.3e-2 (the runs drift apart); the bounds leave ~4-14x for the GPU's kernels."""
    runs = {}
    for amp in ("none", "bfloat16"):
        t = _trainer(_cuda_args(toy_data, tmp_path / amp, f"amp={amp}", "deterministic=true"))
        t.fit()
        runs[amp] = _losses(tmp_path / amp)
    fp32, bf16 = runs["none"], runs["bfloat16"]
    rel = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16)]
    print(f"bf16 vs fp32 losses: {fp32} / {bf16}; max relative difference {max(rel):.2e}")
    assert len(fp32) == len(bf16) == 6 and all(math.isfinite(v) for v in fp32 + bf16)
    assert rel[0] < 5e-3 and max(rel) < 5e-2


@pytest.mark.compile
def test_compiled_student_matches_eager_on_cuda(toy_data: Path, tmp_path: Path) -> None:
    """torch.compile (inductor's CUDA kernels) against eager, as tests/test_compile.py does on the CPU: SGD (Adam
    turns ~0 gradients into lr-sized steps of random sign), 3 fp32 steps, equal up to the reordering of sums
    that fusion brings (TF32 matmuls in both, as in training; the CPU test's bounds, loosened 5x for that)."""
    sgd = ["optim.name=sgd", "optim.lr=0.05", "optim.warmup=0", "amp=none", "total_steps=3"]
    trainers = {}
    for mode in ("false", "true"):
        t = _trainer(_cuda_args(toy_data, tmp_path / mode, f"compile={mode}", *sgd))
        t.fit()
        trainers[mode] = t
    eager, compiled = _losses(tmp_path / "false"), _losses(tmp_path / "true")
    print(f"eager {eager} compiled {compiled}")
    assert compiled == pytest.approx(eager, rel=5e-3)
    a, b = trainers["false"].model.state_dict(), trainers["true"].model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=5e-3, atol=5e-4, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------------------------------
# The online teacher: precision split, channels-last, compile=auto
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r18_cuda() -> Any:
    import teachers
    from teachers.load import build_face_teacher
    from tests.test_teachers import IRESNET, iresnet_shapes, random_weights

    weights = random_weights(iresnet_shapes(IRESNET["iresnet18"]), seed=0)
    return build_face_teacher(teachers.detect_architecture(weights), weights, source="random")


def test_teacher_precision_with_the_fp32_head_on_cuda(r18_cuda: Any) -> None:
    """cuDNN's bf16 / fp16 convolutions with the fp32 ``fc`` + ``features`` head, against fp32 (TF32 off).

    fp16 trunk + fp32 head >= 0.99999 (CPU autocast gives 0.999999 for this net). bf16 keeps 3 mantissa bits
    fewer: its trunk alone costs more than 1e-5 on a deep net (rounding only the weights to bf16 gives
    0.99998 on iResNet-18; CPU: 0.99993 with the fp32 head, 0.99993 without), so for bf16 the checks are:
    >= 0.9999, and no worse than the whole net under autocast."""
    from teachers import TeacherWrapper

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x = torch.rand(16, 3, 112, 112, generator=torch.Generator().manual_seed(3)).cuda() * 2 - 1
        teacher = r18_cuda.cuda()
        ref = TeacherWrapper(teacher, dtype="float32")(x)
        cos = {}
        for dtype in ("float16", "bfloat16"):
            for head in (True, False):
                out = TeacherWrapper(teacher, dtype=dtype, channels_last=True, fp32_head=head)(x)
                assert out.dtype == torch.float32 and torch.isfinite(out).all()
                cos[dtype, head] = F.cosine_similarity(out, ref).min().item()
        print("min cosine to fp32 (dtype, fp32 head):", {k: round(v, 7) for k, v in cos.items()})
        assert cos["float16", True] >= 0.99999
        assert cos["bfloat16", True] >= 0.9999
        assert cos["bfloat16", True] >= cos["bfloat16", False] - 2e-6
    finally:
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True


def test_online_teacher_on_cuda_is_channels_last_and_compiled_by_auto(tmp_path: Path, toy_data: Path) -> None:
    """distill.teacher_compile=auto compiles the teacher on CUDA; a convolutional teacher runs channels-last
    although the student does not (model.channels_last=false); cuDNN autotuning is on. (Not run here: the
    compilation of an iResNet costs a minute; the benchmark's online row runs it.)"""
    from tests.test_teachers import IRESNET, iresnet_shapes, random_weights
    from timmface.config import load_config
    from timmface.distill import DistillTrainer

    path = tmp_path / "backbone.pth"
    torch.save(random_weights(iresnet_shapes(IRESNET["iresnet18"]), seed=0), path)
    args = _cuda_args(toy_data, tmp_path / "run", f"distill.teacher={path}", "model.embed_dim=512", "total_steps=3")
    t = DistillTrainer(load_config(None, args))
    assert t.cfg.distill.teacher_compile == "auto" and t.teacher.compiled and t.teacher.channels_last
    assert not t.cfg.model.channels_last and torch.backends.cudnn.benchmark
    conv = next(m for m in t.teacher.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.is_cuda
    assert t.teacher.describe() == "bf16 trunk + fp32 head, channels-last, compiled"
    t.loader.close()


# --------------------------------------------------------------------------------------------------
# No host syncs in the per-step path
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distill", [False, True])
def test_training_steps_do_not_sync_with_the_host(many_classes: Path, tmp_path: Path, distill: bool) -> None:
    """``torch.cuda.set_sync_debug_mode("error")`` around every ``train_step`` (the reads of a log step come after
    it, in ``fit``): any ``.item()``, ``bool(cuda_tensor)``, ``nonzero``, ``unique`` or blocking copy raises. bf16,
    Partial FC (12 of 24 classes), gradient clipping, EMA, the fused optimiser's on-device skip; with
    ``distill`` an online teacher and the feature term."""
    from tests.test_teachers import IRESNET, iresnet_shapes, random_weights
    from timmface.config import load_config
    from timmface.distill import DistillTrainer
    from timmface.trainer import Trainer

    extra = ["amp=bfloat16", "head.partial_fc=12", "optim.clip_grad_norm=1.0", "log.every=5", "total_steps=12",
             "ema.warmup_steps=2", "ema.every=1", "data.num_workers=2"]  # fmt: skip
    cls: type[Trainer] = Trainer
    if distill:
        path = tmp_path / "backbone.pth"
        torch.save(random_weights(iresnet_shapes(IRESNET["iresnet18"]), seed=0), path)
        extra += [f"distill.teacher={path}", "model.embed_dim=512", "distill.teacher_compile=false"]
        cls = DistillTrainer
    t = cls(load_config(None, _cuda_args(many_classes, tmp_path / "run", *extra)))
    assert t.sync_free
    t.fit(until=2)  # warm-up: CUDA context, cuBLAS/cuDNN handles, the first allocations

    real = t.train_step
    checked = []

    def strict_step() -> Any:  # the host reads of log steps happen after the step, in fit: not in here
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = real()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(t.step + 1)
        return out

    t.train_step = strict_step  # type: ignore[method-assign]
    t.fit()
    assert checked == list(range(3, 13)), checked
    assert all(math.isfinite(v) for v in _losses(tmp_path / "run"))


# --------------------------------------------------------------------------------------------------
# One rank under torchrun, NCCL
# --------------------------------------------------------------------------------------------------


def test_one_rank_under_torchrun_on_cuda(toy_data: Path, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node=1`` runs the CLI on the GPU (sharded head: the code path of a multi-GPU
    run), and an NCCL group of one rank carries timmface's collectives. (timmface does not form a process
    group for a world of one, so the second half calls the collective helpers directly.)"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "timmface.cli",
           "train", *_cuda_args(toy_data, run, "head.sharded=true", "total_steps=3", "save_every=3")]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert len(_losses(run)) == 3 and (run / "checkpoints").is_dir()

    script = tmp_path / "nccl_one_rank.py"
    script.write_text(
        "import os, torch, torch.distributed as dist\n"
        "from timmface.partial_fc import _gather_rows, distributed_cross_entropy\n"
        "torch.cuda.set_device(0)\n"
        "dist.init_process_group('nccl', device_id=torch.device('cuda', 0))\n"
        "x = torch.arange(6.0, device='cuda').view(3, 2)\n"
        "assert torch.equal(_gather_rows(x, [3], None), x)\n"
        "t = torch.ones(4, device='cuda'); dist.all_reduce(t); assert t.sum().item() == 4\n"
        "logits = torch.randn(5, 7, device='cuda'); labels = torch.tensor([0, 3, -1, 6, 2], device='cuda')\n"
        "ce = distributed_cross_entropy(logits, labels)\n"
        "assert torch.isfinite(ce).item()\n"
        "print('nccl', dist.get_backend(), dist.get_world_size())\n"
        "dist.destroy_process_group()\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", str(script)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "nccl nccl 1" in p.stdout, (p.stdout + p.stderr)[-3000:]


# --------------------------------------------------------------------------------------------------
# The benchmark itself on the GPU: one short row, so a broken benchmark is caught by the tests
# --------------------------------------------------------------------------------------------------


def test_tiny_model_trains_with_gpu_decode_and_auto(toy_data: Path, tmp_path: Path, capfd: pytest.CaptureFixture):
    """data.decode=gpu and data.decode=auto train on CUDA; auto says which decoder it kept."""
    from timmface.cli import main

    for decode in ("gpu", "auto"):
        args = _cuda_args(toy_data, tmp_path / decode, f"data.decode={decode}", "data.num_workers=2")
        assert main(["train", *args]) == 0
        assert all(math.isfinite(v) for v in _losses(tmp_path / decode))
    out = capfd.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("data.decode=auto:")]
    assert len(line) == 1 and line[0].rstrip(".").split()[-1] in ("cpu", "gpu"), out[-2000:]
