"""Run logs: ``metrics.jsonl``, a progress display, optional W&B / TensorBoard."""

from __future__ import annotations

import json
import math
import sys
import time
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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


class Progress:
    """A rich progress bar on an interactive terminal, plain periodic lines otherwise."""

    def __init__(self, total: int, start: int = 0, mode: str = "auto", enabled: bool = True) -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode if enabled else "off"
        self.total, self.start_step = total, start
        self.t0 = time.perf_counter()
        self._bar = None
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def update(self, step: int, values: dict[str, Any], emit: bool) -> None:
        if self.mode == "rich" and self._bar is not None:
            info = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items())
            self._bar.update(self._task, completed=step, info=info)
        elif self.mode == "plain" and emit:
            eta = self.eta(step)
            eta_s = f"{eta / 60:.1f}min" if math.isfinite(eta) else "?"
            items = "  ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            print(f"step {step}/{self.total}  {items}  eta={eta_s}", flush=True)

    def message(self, text: str) -> None:
        if self.mode == "rich" and self._bar is not None:
            self._bar.console.print(text)
        elif self.mode != "off":
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
