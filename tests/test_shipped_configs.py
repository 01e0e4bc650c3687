"""Every shipped config builds and trains: 2 steps of each on the tiny toy data, CPU, with size overrides; the
README names no config that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import tiny_run_args
from timmface.cli import main
from timmface.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_teacher(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32-d test_vit run on the toy data: the teacher every distillation recipe gets here."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["train", *tiny_run_args(toy_data, run, "total_steps=2", "eval_every=0")]) == 0
    return run


def _size_overrides(path: Path, data: Path, out: Path) -> list[str]:
    """What shrinks a real recipe to seconds on a CPU: the toy data at 32x32, batch 8, 2 steps, no compile."""
    model = load_config(path).model
    extra = ["model.kwargs.img_size=32"] if "img_size" in model.kwargs or "vit" in model.backbone else []
    return [
        f"data.path={data}", f"output_dir={out}", "data.image_size=32", "model.embed_dim=32", "batch_size=8",
        "total_steps=2", "eval_every=0", "save_every=0", "data.num_workers=0", "amp=none", "compile=false",
        "log.progress=off", "log.every=1", "ema.warmup_steps=1", "ema.every=1", "optim.grad_accum=1", *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_trains_two_steps(path: Path, toy_data: Path, tiny_teacher: Path, tmp_path: Path):
    args = _size_overrides(path, toy_data, tmp_path / "run")
    command = "distill" if "distill" in path.stem else "train"
    if command == "distill":
        args.append(f"distill.teacher={tiny_teacher}")
    assert main([command, "--config", str(path), *args]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in x for x in lines) == 2


def test_readme_names_only_configs_that_exist():
    text = (ROOT / "README.md").read_text()
    named = sorted(set(re.findall(r"configs/[\w.*\-/]+\.ya?ml", text)))
    assert named, "the README names no config"
    missing = [n for n in named if not list(ROOT.glob(n))]
    assert not missing, f"README names configs that do not exist: {missing}"
