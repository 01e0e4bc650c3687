"""Optimisers and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from timmface.config import OptimConfig
from timmface.errors import ConfigError


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` is a fraction of the run when < 1, else a number of steps."""
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


def cosine_lr(step: float, base_lr: float, total_steps: int, warmup: int, final_mult: float = 0.01) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine from ``base_lr`` to ``base_lr * final_mult``.

    ``step`` counts completed optimiser steps (the lr used *for* step ``step + 1``); a fraction is a position
    between two steps (a schedule stretched by a resume with a longer ``total_steps``).
    """
    final = base_lr * final_mult
    if step < warmup:
        return base_lr * step / warmup
    if step >= total_steps:
        return final
    progress = (step - warmup) / max(1, total_steps - warmup)
    return final + 0.5 * (base_lr - final) * (1 + math.cos(math.pi * progress))


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The optimiser of ``optim.name``. ``fused``: torch's fused AdamW / SGD kernels (one launch for every
    parameter; the trainer asks for them on CUDA), which also skip a step on the device when given a
    ``found_inf`` flag (:mod:`timmface.sync_free`). Lamb (timm's) has no fused form."""
    params = [p for p in params if p.requires_grad]
    name = cfg.name.lower()
    kind = {"fused": True} if fused else {}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), **kind)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **kind)
    if name == "lamb":
        from timm.optim import Lamb

        return Lamb(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    raise ConfigError(f"optim.name: unknown optimiser '{cfg.name}' (adamw, sgd, lamb)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
