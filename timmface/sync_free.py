"""Training steps that never wait for the device, and how the trainer still logs and skips non-finite steps.

A host read of a device value (``.item()``, ``float(t)``, ``bool(t)``, ``nonzero``, ``torch.unique``, a blocking
copy to the CPU) makes the host wait until the device has finished everything queued before it. Once per step,
that keeps the host from queueing step ``k + 1`` while the device runs step ``k``: the device then idles through
the step's host work (loader hand-over, optimiser call, logging). So on CUDA the trainer's step reads nothing
back (``Trainer.sync_free``):

* the logged values are summed on the device (:class:`StepMeter`) and read once per log window, in one copy;
* a non-finite loss skips the update on the device: the fused optimisers (AdamW, Adam and SGD with
  ``fused=True``) take a ``found_inf`` flag, as they do under :class:`torch.amp.GradScaler`, and then leave the
  weights, the moments and the step counters as they were (:func:`step_unless`); the margin loss's running
  statistics are put back with ``torch.where``;
* the flags are read where the host waits anyway -- a log line, an evaluation, a checkpoint, the end of a
  ``fit`` (:class:`NonfiniteFlags`) -- then counted, warned about, and past the budget (or with
  ``nonfinite=stop``) the run stops naming the step that had the non-finite loss. No checkpoint is written
  before the flags of the steps it holds were read, so the "last good checkpoint" a stop names is from before
  that step. The only difference from reading at every step: the run stops at the next such point instead of
  at once (at most ``log.every`` steps later, with the bad step's update skipped all the same).

On a CPU the host and the device are the same processor and a read costs nothing: there the trainer keeps the
immediate check (``Trainer.sync_free`` is false), and a test runs the sync-free path on the CPU against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["NonfiniteFlags", "StepMeter", "can_skip_on_device", "step_unless"]


def can_skip_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a ``found_inf`` flag on the device (the fused optimisers)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def step_unless(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """``optimizer.step()``, skipped on the device where ``skip`` (a 0-d bool tensor) is true: the protocol
    :class:`torch.amp.GradScaler` uses with fused optimisers (``found_inf`` read in ``step``; the fused kernel
    leaves every parameter and moment as it was, and the step counters are decremented back)."""
    optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]


class StepMeter:
    """The sums, over the steps of one log window, of what :meth:`Trainer.train_step` returns.

    Tensors are summed on their device in float64 (so the totals equal a host sum of ``float(value)`` per step,
    addition for addition), numbers on the host; :meth:`read` copies every device sum to the host at once.
    ``images`` is a plain count, not averaged. What a window reports matches the per-step check, where a
    skipped step returns only :attr:`SKIPPED_KEYS`: ``skipped`` is dropped when no step was skipped, and when
    every step was, the keys a skipped step does not report.
    """

    SKIPPED_KEYS = ("lr", "loss", "skipped")

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.steps = 0

    def add(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, Tensor):
                value = value.detach().to(torch.float64)
            else:
                value = float(value)
            previous = self.sums.get(key)
            self.sums[key] = value if previous is None else previous + value
        self.steps += 1

    def read(self) -> tuple[dict[str, float], float]:
        """``(means over the window's steps, images)``; starts the next window."""
        keys = [k for k, v in self.sums.items() if isinstance(v, Tensor)]
        host = torch.stack([self.sums[k] for k in keys]).cpu().tolist() if keys else []  # type: ignore[misc]
        totals = {k: float(v) for k, v in self.sums.items() if not isinstance(v, Tensor)}
        totals.update(zip(keys, host))
        images = totals.pop("images", 0.0)
        skipped = totals.get("skipped")
        if skipped == 0.0:
            del totals["skipped"]
        elif skipped == self.steps:
            totals = {k: v for k, v in totals.items() if k in self.SKIPPED_KEYS}
        means = {k: v / max(self.steps, 1) for k, v in totals.items()}
        self.sums, self.steps = {}, 0
        return means, images


class NonfiniteFlags:
    """Per-step "the loss was non-finite" flags kept on the device until the host reads them all at once."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, Tensor]] = []

    def add(self, step: int, flag: Tensor) -> None:
        """``flag``: a 0-d bool tensor, true when step ``step`` (1-based) had a non-finite loss."""
        self.pending.append((step, flag))

    def resolve(self, on_nonfinite: Callable[[int], None]) -> None:
        """Read the pending flags (one device-to-host copy) and call ``on_nonfinite(step)`` for each flagged
        step, in order (it may raise: the remaining flags are then dropped with the run)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flags = torch.stack([flag for _, flag in pending]).cpu().tolist()
        for (step, _), bad in zip(pending, flags):
            if bad:
                on_nonfinite(step)
