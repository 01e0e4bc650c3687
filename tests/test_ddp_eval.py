"""In-training evaluation under DDP equals ``timmface eval`` of the checkpoint saved at that step.

With ``forward_sync_buffers=False`` every rank keeps its own BatchNorm running statistics, and the
evaluation images are split across ranks: without a synchronisation each rank's slice would be embedded
by a different model, and none of them would be the model the checkpoint (rank 0's) holds. Two gloo
ranks train a BatchNorm student (timm's ``test_efficientnet``) on different halves of each batch, so
their statistics differ; the accuracy logged during training, the embeddings it was computed from, and
the checkpoint's evaluation by the real CLI must all agree, for the live weights and for the EMA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_run_args
from tests.test_distributed import spawn
from tests.test_eval_cli import hard_bin
from timmface.checkpoint import checkpoint_path
from timmface.cli import main
from timmface.config import load_config
from timmface.trainer import Trainer

BN_MODEL = ["model.backbone=test_efficientnet", "model.embed_dim=32", "data.image_size=32"]


def bn_run_args(data: Path, out: Path, *extra: str) -> list[str]:
    """:func:`tiny_run_args` with a BatchNorm student instead of the LayerNorm ``test_vit``."""
    return [a for a in tiny_run_args(data, out) if not a.startswith("model.")] + [*BN_MODEL, *extra]


def _bn_run(rank: int, world: int, args: list[str]) -> dict[str, Any]:
    trainer = Trainer(load_config(None, args))
    captured: list[torch.Tensor] = []
    embed = trainer.embed_images

    def capture(backbone: torch.nn.Module, images: list[bytes]) -> torch.Tensor:
        out = embed(backbone, images)
        captured.append(out.clone())
        return out

    trainer.embed_images = capture  # type: ignore[method-assign]
    trainer.fit()
    buffers = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items() if "running_" in k}
    return {"embeddings": captured, "buffers": buffers}


def _metrics(run: Path) -> dict[int, dict[str, Any]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "acc/hard" in m}


@pytest.mark.multiprocess
def test_ddp_evaluation_equals_eval_of_the_saved_checkpoint(toy_data: Path, tmp_path: Path):
    """Step 2 evaluates the live weights (the EMA starts at step 3), step 4 the EMA's."""
    run, val = tmp_path / "run", hard_bin(tmp_path / "hard.bin")
    args = bn_run_args(
        toy_data, run, "total_steps=4", "eval_every=2", "save_every=2", "log.progress=off", f"data.val_sets=[{val}]",
        "ema.warmup_steps=3", "ema.every=1", "ema.decay=0.5", "optim.lr=3e-3",
    )  # fmt: skip
    r0, r1 = spawn(_bn_run, 2, args, tmp=tmp_path)
    logged = _metrics(run)
    assert sorted(logged) == [2, 4]
    assert len({logged[s]["acc/hard"] for s in logged} | {0.0, 1.0}) > 2  # not saturated: the numbers tell
    for i, step in enumerate((2, 4)):
        # both ranks evaluated one model: the gathered embeddings are the same on both
        torch.testing.assert_close(r0["embeddings"][i], r1["embeddings"][i], rtol=0, atol=0)
        # ... and it is the model of the checkpoint: the CLI's embeddings and numbers are the same
        from timmface.commands.eval import load_model
        from timmface.data.bin import read_bin
        from timmface.evaluation.verification import embed_pairs

        ckpt = checkpoint_path(run, step)
        loaded = load_model(str(ckpt))
        images, _ = read_bin(val)
        expected = embed_pairs(loaded.module.eval(), images, image_size=32)
        torch.testing.assert_close(r0["embeddings"][i], expected, rtol=1e-4, atol=1e-4)

        out = tmp_path / f"eval{step}.json"
        assert main(["eval", "--model", str(ckpt), "--bins", str(val), "--json", str(out)]) == 0
        entry = json.loads(out.read_text())["bins"]["hard"]
        assert logged[step]["acc/hard"] == pytest.approx(entry["accuracy"], abs=1e-12)
        assert logged[step]["acc_std/hard"] == pytest.approx(entry["std"], abs=1e-12)
        assert logged[step]["threshold/hard"] == pytest.approx(entry["threshold"], abs=1e-12)
    # the ranks end with one set of BatchNorm statistics (the checkpoint's)
    for k, v in r0["buffers"].items():
        torch.testing.assert_close(r1["buffers"][k], v, rtol=0, atol=0, msg=k)
