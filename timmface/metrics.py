"""Run logs: ``metrics.jsonl``, a progress display, optional W&B / TensorBoard."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from timmface.fileio import atomic_write

__all__ = ["MetricsWriter", "Progress", "read_metrics"]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsWriter:
    """Appends one JSON object per line (``{"step": ..., ...}``) to ``output_dir/metrics.jsonl``."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool = True,
        wandb: bool = False,
        tensorboard: bool = False,
        wandb_project: str = "timmface",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._wandb = self._tb = None
        if not enabled:
            return
        if wandb:
            try:
                import wandb as wb
            except ImportError as e:
                raise ImportError("log.wandb=true needs wandb: pip install timmface[wandb]") from e
            self._wandb = wb.init(project=wandb_project, dir=str(output_dir), config=config, resume="allow")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("log.tensorboard=true needs tensorboard: pip install timmface[tensorboard]") from e
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run repeats them)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    kept.append(line)
            except (ValueError, AttributeError):
                continue  # a line cut short by a crash
        with atomic_write(self.path, hidden=True) as f:
            f.write("".join(k + "\n" for k in kept).encode())

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a run folder or the file), skipping broken lines."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}min" if math.isfinite(seconds) else "?"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


class Progress:
    """A rich progress bar on an interactive terminal, plain periodic lines otherwise.

    The ETA counts the evaluations still to come: training time per step (evaluation time left out) times
    the steps left, plus the evaluations left times the duration of the last one (before the first, the
    estimate the trainer measured on a few images with :meth:`set_eval_estimate`). ``eval_every``: ``None``
    = no evaluation, ``0`` = only at the end, else every that many steps and at the end (the trainer's
    schedule). ``clock`` is for tests.
    """

    def __init__(
        self,
        total: int,
        start: int = 0,
        mode: str = "auto",
        enabled: bool = True,
        eval_every: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode if enabled else "off"
        self.total, self.start_step = total, start
        self.clock = clock
        self.t0 = clock()
        self.eval_every = eval_every
        self.eval_seconds = 0.0  # spent evaluating since t0: not training time
        self.eval_cost: float | None = None  # seconds per evaluation: the estimate, then the last measured
        self.last_eval_step = start  # a resumed run's evaluation at its start step happened before it stopped
        self._bar = None
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("eta {task.fields[eta]}"),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="", eta="?")
            self._bar.start()

    def set_eval_estimate(self, seconds: float) -> None:
        """Seconds one evaluation is expected to take, until one has been timed."""
        if self.eval_cost is None or self.last_eval_step == self.start_step:
            self.eval_cost = seconds

    def eval_done(self, step: int, seconds: float) -> None:
        """The evaluation at ``step`` took ``seconds``."""
        self.eval_seconds += seconds
        self.eval_cost = seconds
        self.last_eval_step = step

    def evals_left(self, step: int) -> int:
        """Evaluations at steps ``step .. total`` that have not run yet."""
        every, lo, hi = self.eval_every, max(step, self.last_eval_step + 1), self.total
        if every is None or lo > hi:
            return 0
        if every <= 0:
            return 1
        return hi // every - (lo - 1) // every + (1 if hi % every else 0)

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        per_step = max(0.0, self.clock() - self.t0 - self.eval_seconds) / done
        return per_step * (self.total - step) + (self.eval_cost or 0.0) * self.evals_left(step)

    def update(self, step: int, values: dict[str, Any], emit: bool) -> None:
        if self.mode == "rich" and self._bar is not None:
            info = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items())
            self._bar.update(self._task, completed=step, info=info, eta=_minutes(self.eta(step)))
        elif self.mode == "plain" and emit:
            items = "  ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            print(f"step {step}/{self.total}  {items}  eta={_minutes(self.eta(step))}", flush=True)

    def message(self, text: str) -> None:
        if self.mode == "rich" and self._bar is not None:
            self._bar.console.print(text)
        elif self.mode != "off":
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
