"""torch.compile: one compiled training run on CPU (the tiniest model), the fullgraph fallback, and a
CPU smoke run of the GPU throughput benchmark.

Compiling costs ~40 s on this project's 2-core CPU even for ``test_vit`` (REFERENCE.md: ~60 s for real
models, no steady-state gain), so there is exactly one ``compile``-marked test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tests.conftest import tiny_run_args
from timmface.checkpoint import list_checkpoints
from timmface.config import load_config
from timmface.runtime import compile_module
from timmface.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.compile
def test_compiled_training_matches_eager(toy_data: Path, tmp_path: Path, capsys):
    # SGD: Adam turns the ~0 gradients of the attention's key bias into lr-sized steps of random sign
    sgd = ["optim.name=sgd", "optim.lr=0.05", "optim.warmup=0"]
    extra = ["total_steps=3", "save_every=0", "eval_every=0", "log.progress='off'", *sgd]
    eager = Trainer(load_config(None, tiny_run_args(toy_data, tmp_path / "eager", *extra)))
    eager.fit()
    compiled = Trainer(load_config(None, tiny_run_args(toy_data, tmp_path / "compiled", *extra, "compile=true")))
    assert compiled.cfg.compile_fullgraph
    compiled.fit()
    assert "warning: compile" not in capsys.readouterr().out  # test_vit compiles as one graph
    # inductor reorders floating-point work: equal up to rounding, step by step
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-3)
    for (k, a), (_, b) in zip(eager.model.state_dict().items(), compiled.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    ckpt = torch.load(list_checkpoints(tmp_path / "compiled")[-1][1], weights_only=True)
    assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["model"])


class _GraphBreak(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        if x.sum().item() > 0:  # data-dependent control flow: not one graph
            return x * 2
        return x - 1


def test_fullgraph_falls_back_with_one_warning_line(capsys):
    module = _GraphBreak()
    compile_module(module, fullgraph=True, name="graph_break", backend="eager")  # dynamo only: no inductor cost
    x = torch.ones(3)
    assert torch.equal(module(x), x * 2)
    assert torch.equal(module(-x), -x - 1)
    lines = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: compile: graph_break is not one graph")


@pytest.mark.slow
def test_gpu_throughput_benchmark_cpu_smoke():
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--cpu-smoke"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if not line.startswith("#")]
    assert [line.split(" batch=")[0] for line in lines] == [
        "vit_ti8 teacher=none", "vit_ti8 teacher=iresnet50", "convnext_atto teacher=none",
        "convnext_atto teacher=iresnet50",
    ]  # fmt: skip
    assert all("img/s=" in line for line in lines)
