"""Test-only fault injection: make a process die, hang or fail at a named point, from an environment variable.

The reliability tests (``tests/test_faults.py``) need a real process to be killed at exact moments that
an outside ``kill -9`` can only hit by luck: between writing a checkpoint's temporary file and renaming
it, half-way through that write, between the rename and pruning the old checkpoints; or one DDP rank to
stop answering at a given step. The code calls :func:`fault` at those points; it does nothing unless
``TIMMFACE_FAULT`` is set, which no user-facing option does. **Never set it outside tests.**

``TIMMFACE_FAULT`` is a comma-separated list of ``ACTION@POINT[:key=value...]``:

* ``ACTION``: ``kill`` (SIGKILL this process: no cleanup, no ``finally``), ``hang`` (sleep until killed),
  ``truncate`` (points that name a ``file``: cut it to half its size, then SIGKILL -- a write cut short).
* ``POINT``: ``checkpoint.written`` (the temporary file is complete and synced, not yet renamed),
  ``checkpoint.renamed`` (the new checkpoint is in place, older ones not yet pruned), ``train.step``
  (after optimiser step ``step``).
* ``key=value`` filters that must all match the point's context: ``name`` (the checkpoint's file name),
  ``step``, ``rank`` (``RANK`` of the process, 0 when unset), ``restart`` (torchrun's restart count, so a
  restarted worker group does not meet the same fault again).

Example: ``TIMMFACE_FAULT=kill@checkpoint.written:name=step_00000006.pt``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

ENV = "TIMMFACE_FAULT"
__all__ = ["ENV", "fault"]


def _matches(filters: list[str], context: dict[str, Any]) -> bool:
    for item in filters:
        key, _, want = item.partition("=")
        if str(context.get(key, "")) != want:
            return False
    return True


def fault(point: str, file: str | os.PathLike[str] | None = None, **context: Any) -> None:
    """Act on ``TIMMFACE_FAULT`` if it names ``point`` with matching filters; a no-op when it is unset."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    context.setdefault("rank", os.environ.get("RANK", "0"))
    context.setdefault("restart", os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if file is not None:
        context.setdefault("name", Path(file).name)
    for item in spec.split(","):
        action, _, rest = item.strip().partition("@")
        where, *filters = rest.split(":")
        if where != point or not _matches(filters, context):
            continue
        print(f"{ENV}: {action} at {point} {context}", flush=True)
        if action == "truncate" and file is not None:
            size = Path(file).stat().st_size
            os.truncate(file, size // 2)
            action = "kill"
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "hang":
            while True:
                time.sleep(3600)
        raise ValueError(f"{ENV}: unknown action {action!r} in {item!r}")
