"""Shared fixtures: tiny datasets written in the real formats, tiny models, offline hub."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMMFACE_CACHE", str(Path(__file__).parent / ".cache"))


def class_image(label: int, sample: int, size: int = 32) -> torch.Tensor:
    """uint8 CHW: a per-class random pattern plus per-sample noise (learnable in a few steps)."""
    g = torch.Generator().manual_seed(1000 + label)
    base = torch.randint(0, 256, (3, 4, 4), generator=g).float()
    base = torch.nn.functional.interpolate(base[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    g2 = torch.Generator().manual_seed(50_000 + 97 * label + sample)
    noisy = base + torch.randn(3, size, size, generator=g2) * 12
    return noisy.round().clamp(0, 255).to(torch.uint8)


def write_toy_dataset(root: Path, num_classes: int = 8, per_class: int = 6, size: int = 32, pairs: int = 20) -> Path:
    """A RecordIO folder (train.rec/.idx/property) plus ``toy_val.bin`` of same/different pairs."""
    from torchvision.io import encode_jpeg

    from timmface.data.bin import write_bin
    from timmface.data.recordio import RecordIOWriter

    with RecordIOWriter(root, num_classes=num_classes, image_size=(size, size)) as w:
        for c in range(num_classes):
            for s in range(per_class):
                w.add(class_image(c, s, size), c)
    images, issame = [], []
    for i in range(pairs):
        a = i % num_classes
        b = a if i % 2 == 0 else (a + 1) % num_classes
        images += [
            encode_jpeg(class_image(a, 100 + i, size), quality=95).numpy().tobytes(),
            encode_jpeg(class_image(b, 200 + i, size), quality=95).numpy().tobytes(),
        ]
        issame.append(a == b)
    write_bin(root / "toy_val.bin", images, issame)
    return root


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("data") / "toy")


TINY_MODEL = ["model.backbone=test_vit", "model.kwargs={img_size: 32}", "model.embed_dim=32", "data.image_size=32"]


def tiny_run_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a few-second CPU run of the real trainer."""
    return [
        f"data.path={data}", f"output_dir={out}", *TINY_MODEL, "batch_size=8", "total_steps=6",
        "eval_every=3", "save_every=3", "data.num_workers=0", "amp=none", "log.progress=plain",
        "log.every=1", "ema.warmup_steps=2", "ema.every=1", "optim.lr=1e-3", *extra,
    ]  # fmt: skip


def whole_and_resumed(make: Callable[[Path, list[str]], Any], whole_dir: Path, part_dir: Path, until: int = 3):
    """An uninterrupted run in ``whole_dir``, and in ``part_dir`` a run stopped at step ``until`` then resumed
    (``resume=auto``) to the end; ``make(output_dir, extra_overrides)`` builds a trainer. Returns both
    finished trainers after checking that the second one resumed at ``until``."""
    whole = make(whole_dir, [])
    whole.fit()
    first = make(part_dir, [])
    first.fit(until=until)
    del first
    second = make(part_dir, ["resume=auto"])
    assert second.step == until
    second.fit()
    return whole, second


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
