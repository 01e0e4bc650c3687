"""timm teachers: a timm hub folder, timmface checkpoints and a timmface run directory.

Checkpoints are written exactly as the trainer / ``timm.models.save_for_hf`` write them; the reference
is the in-memory timm model the weights came from, run on the same batch.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import students
import teachers
from tests.test_teachers import assert_one_line, rgb_batch
from timmface.errors import TeacherError

EMBED = 32
FACE_KWARGS = {"channels": [8, 16, 16, 32], "stem_width": 8}  # a tiny face_resnet18 (stride-1 stem)


def student(seed: int, backbone: str = "test_resnet", **kwargs: object) -> nn.Module:
    """A student as the trainer builds it, with random weights and non-trivial BN running stats."""
    torch.manual_seed(seed)
    model = students.create_student(backbone, embed_dim=EMBED, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.normal_(1, 0.2)
    return model.eval()


def timmface_checkpoint(model: nn.Module, ema: nn.Module | None, step: int, backbone: str, kwargs: dict) -> dict:
    """A checkpoint in timmface's format (see the trainer): plain config, timm state dicts, training state."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return {
        "format": "timmface",
        "version": 1,
        "step": step,
        "config": {
            "model": {"backbone": backbone, "kwargs": kwargs, "embed_dim": EMBED, "pretrained": False},
            "optim": {"lr": 1e-3, "weight_decay": 0.05},
            "data": {"path": "/data/ms1mv3", "augmentations": [{"name": "ColorJitter", "args": [0.1, 0.1]}]},
        },
        "model": model.state_dict(),
        "ema": None if ema is None else ema.state_dict(),
        "head": {"weight": torch.randn(10, EMBED)},
        "optimizer": opt.state_dict(),
        "scheduler": {"last_epoch": step},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "data_position": {"epoch": 0, "index": step * 8},
    }


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"network access attempted: {args}")


def test_timm_hub_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _no_network)  # local-dir loading must stay offline
    model = student(0, "face_resnet18", **FACE_KWARGS)
    folder = tmp_path / "face_resnet18.cosface_ms1mv3"
    timm.models.save_for_hf(
        model, str(folder), model_args={"num_classes": EMBED, **FACE_KWARGS}, safe_serialization=True
    )
    assert json.loads((folder / "config.json").read_text())["architecture"] == "face_resnet18"
    t = teachers.load_teacher(folder)
    assert not any(p.requires_grad for p in t.parameters()) and not t.training
    x = rgb_batch(2, size=112)
    with torch.no_grad():
        torch.testing.assert_close(t(x), model(x), rtol=1e-5, atol=1e-5)
    info = t.teacher_info
    assert (info["format"], info["architecture"], info["embed_dim"]) == ("timm_hub", "face_resnet18", EMBED)
    assert t.input_size == (3, 112, 112) and info["input"].startswith("RGB, [-1, 1]")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert teachers.teacher_fingerprint(folder) != teachers.teacher_fingerprint(folder / "model.safetensors")


def test_timm_hub_folder_with_imagenet_normalisation(tmp_path: Path) -> None:
    """A folder whose pretrained_cfg says ImageNet mean/std gets (x01 - mean)/std, from our [-1, 1] batch."""
    model = student(1)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    folder = tmp_path / "hub"
    timm.models.save_for_hf(model, str(folder), model_args={"num_classes": EMBED}, safe_serialization=True)
    t = teachers.load_teacher(folder)
    x = rgb_batch(2)
    mean, std = (
        torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        torch.testing.assert_close(t(x), model(((x + 1) / 2 - mean) / std), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(t(x), model(x), atol=1e-3)
    assert "mean=" in t.teacher_info["input"]


def test_timmface_checkpoint_prefers_ema(tmp_path: Path) -> None:
    model, ema = student(2), student(3)
    path = tmp_path / "step_00001000.pt"
    torch.save(timmface_checkpoint(model, ema, 1000, "test_resnet", {}), path)
    t = teachers.load_teacher(path)
    x = rgb_batch(2)
    with torch.no_grad():
        out = t(x)
        torch.testing.assert_close(out, ema(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, model(x), atol=1e-3)
    info = t.teacher_info
    assert (info["format"], info["architecture"], info["weights"], info["step"]) == (
        "timmface_checkpoint",
        "test_resnet",
        "ema",
        1000,
    )
    assert t.input_size == (3, 112, 112) and t.embed_dim == EMBED


def test_timmface_checkpoint_without_ema_uses_model(tmp_path: Path) -> None:
    model = student(4)
    path = tmp_path / "last.pt"
    torch.save(timmface_checkpoint(model, None, 10, "test_resnet", {}), path)
    t = teachers.load_teacher(path)
    x = rgb_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(t(x), model(x), rtol=1e-5, atol=1e-5)
    assert t.teacher_info["weights"] == "model"


def test_timmface_run_directory_uses_latest_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  backbone: test_vit\n")
    (run / "metrics.jsonl").write_text('{"step": 500, "loss": 10.0}\n')
    kwargs = {"img_size": 64}
    models = {
        step: (student(10 + step, "test_vit", **kwargs), student(20 + step, "test_vit", **kwargs))
        for step in (500, 2000, 1000)
    }
    for step, (model, ema) in models.items():
        torch.save(
            timmface_checkpoint(model, ema, step, "test_vit", kwargs), run / "checkpoints" / f"step_{step:08d}.pt"
        )
    t = teachers.load_teacher(run)
    assert t.teacher_info["format"] == "timmface_run" and t.teacher_info["step"] == 2000
    # trained at 64x64 (img_size): a 112x112 batch is resized to it inside
    assert t.input_size == (3, 64, 64)
    x = rgb_batch(2, size=112)
    with torch.no_grad():
        expected = models[2000][1](
            F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        )
        torch.testing.assert_close(t(x), expected, rtol=1e-5, atol=1e-5)
    latest = run / "checkpoints" / "step_00002000.pt"
    assert teachers.teacher_fingerprint(run) == teachers.teacher_fingerprint(latest)
    assert teachers.teacher_files(run) == [latest]


def test_timmface_checkpoint_with_wrong_weights(tmp_path: Path) -> None:
    model = student(5)
    ckpt = timmface_checkpoint(model, None, 1, "test_resnet", {})
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("fc.")}
    path = tmp_path / "step_00000001.pt"
    torch.save(ckpt, path)
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher(path)
    message = assert_one_line(e)
    assert "missing 2 keys (fc.weight, fc.bias)" in message and "test_resnet" in message


def test_timm_arch_must_match(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(timmface_checkpoint(student(6), None, 1, "test_resnet", {}), path)
    assert teachers.load_teacher(path, arch="test_resnet").teacher_info["architecture"] == "test_resnet"
    with pytest.raises(TeacherError, match="holds a 'test_resnet' model but arch='iresnet50'"):
        teachers.load_teacher(path, arch="iresnet50")
