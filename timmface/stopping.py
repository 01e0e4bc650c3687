"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler pre-empting or ending the job).

The first signal only sets a flag: the trainer finishes the optimiser step under way, saves a checkpoint,
says how to resume and exits 130. The handlers of both signals are then reset to the default action, so a
second signal ends the process at once, even inside a long C call (a save, a collective).

Under DDP all ranks must stop after the same step, though a signal may reach only some of them (a user
killing one process) or reach them at different moments. Each rank all-reduces (max) its flag once per step,
asynchronously, and reads the result one step later: every rank reads the same value after the same step.
The read waits only for the *previous* step's work, which the device has finished or nearly finished by then,
so it adds no host-device synchronisation to the step (on CUDA: a fill kernel, the NCCL all-reduce, a copy
into pinned memory and an event; the host waits on the event one step later). The price is that a
distributed run stops one step after the signal; a single process stops after the step under way.

Data-loader workers ignore both signals (:func:`ignore_stop_signals`, their ``worker_init_fn``): Ctrl-C and
SLURM's SIGTERM reach the whole process group, and a worker that died of it would fail the step under way
(PyTorch's SIGCHLD handler raises in the trainer at once). They end with the trainer, as always, or when
they see it gone.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SIGNALS", "StopRequest", "Interrupted", "ignore_stop_signals"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A data-loader worker's ``worker_init_fn``: leave SIGINT and SIGTERM to the trainer process.

    (It replaces PyTorch's worker SIGTERM handler, which exits; a worker still ends when the trainer shuts it
    down, or within seconds of the trainer's death through PyTorch's watchdog.)"""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal after saving its checkpoint (the CLI exits 130, as for Ctrl-C)."""


class StopRequest:
    """The per-run stop flag: signal handlers set it, :meth:`agreed` tells every rank alike when to stop."""

    def __init__(self, device: torch.device, distributed: bool) -> None:
        self.device, self.distributed = device, distributed
        self.signum: int | None = None
        """The signal this process received (``None``: none yet)."""
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, torch.Tensor, torch.cuda.Event | None] | None = None
        self._host: torch.Tensor | None = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop signal on another rank"

    # ------------------------------------------------------------------------------------ handlers

    def install(self) -> None:
        """Catch SIGINT and SIGTERM (only the main thread may; elsewhere the defaults stay). A signal the process
        was started to ignore stays ignored (a background job of a non-interactive shell ignores SIGINT, as
        Python itself respects: Ctrl-C in the terminal is not meant for it)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            previous = signal.getsignal(s)
            if previous == signal.SIG_IGN:
                continue
            self._previous[s] = previous
            signal.signal(s, self._handle)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker: the trainer decides, the worker serves on
            return
        self.signum = signum
        for s in self._previous:  # the next signal: the default action, at once
            signal.signal(s, signal.SIG_DFL)

    # ----------------------------------------------------------------------------------- agreement

    def agreed(self) -> bool:
        """Whether every rank stops now. Call once per step on every rank.

        One process: this process's flag. DDP: the flags of all ranks as they were one call earlier.
        """
        if not self.distributed:
            return self.signum is not None
        stop = self._read() if self._pending is not None else False
        self._post(self.signum is not None)
        return stop

    def drain(self) -> None:
        """Complete the all-reduce still in flight (before the process group is used otherwise or ends)."""
        if self._pending is not None:
            self._read()

    def _post(self, local: bool) -> None:
        flag = torch.full((1,), float(local), device=self.device)  # a fill kernel: no host-to-device copy
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        event = None
        if self.device.type == "cuda":
            work.wait()  # NCCL: the current stream waits for the all-reduce; the host does not
            if self._host is None:
                self._host = torch.empty(1, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending = (work, flag, event)

    def _read(self) -> bool:
        assert self._pending is not None
        work, flag, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # the previous step's kernels, the all-reduce and the copy; nothing newer
            assert self._host is not None
            return bool(self._host[0] > 0)
        work.wait()
        return bool(flag[0] > 0)
