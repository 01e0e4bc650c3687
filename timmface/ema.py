"""Exponential moving average of the backbone's weights (the seed's schedule).

The average starts as a copy of the weights at ``warmup_steps`` and is then updated every
``every`` steps with ``ema = decay * ema + (1 - decay) * weights``; integer buffers (BatchNorm's
``num_batches_tracked``) are copied. Before the copy the EMA is not "active" and evaluation uses
the live weights.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(itertools.chain(module.parameters(), module.buffers()))


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup_steps: int = 100, every: int = 10) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup_steps, self.every = decay, warmup_steps, every
        self.active = False

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after optimiser step ``step`` (1-based count of completed steps)."""
        if step < self.warmup_steps:
            return
        src, dst = _tensors(model), _tensors(self.module)
        if not self.active:
            for d, s in zip(dst, src):
                d.copy_(s)
            self.active = True
            return
        if (step - self.warmup_steps) % self.every:
            return
        floats = [(d, s) for d, s in zip(dst, src) if d.is_floating_point()]
        if floats:
            torch._foreach_lerp_([d for d, _ in floats], [s.to(d.dtype) for d, s in floats], 1.0 - self.decay)
        for d, s in zip(dst, src):
            if not d.is_floating_point():
                d.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "active": self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.active = bool(state["active"])
