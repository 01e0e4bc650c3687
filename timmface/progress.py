"""Progress of a job counted in images (``timmface embed``, ``timmface eval``), on a terminal and in a log file."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["CountProgress"]


class CountProgress:
    """A rich progress bar on a terminal. Elsewhere (a pipe, a batch job's log) plain lines
    ``label: done/total (percent), rate img/s, eta`` -- the first as soon as the first batch is done, so that a log
    shows at once that the work started and how fast it goes, then one every ``every`` seconds, and the last at
    the end.

    ``total`` may be given later (:meth:`set`), when the caller learns it only once the work starts.
    """

    def __init__(
        self, label: str, total: int | None = None, done: int = 0, *, enabled: bool = True, every: float = 30.0
    ) -> None:
        self.label, self.total, self.done, self.every = label, total, done, every
        self.mode = ("rich" if sys.stdout.isatty() else "plain") if enabled else "off"
        self.start = done
        self.t0 = time.perf_counter()
        self.last: float | None = None  # when the last plain line was printed (None: none yet)
        self._bar: Any = None
        self._task: Any = None

    def _start_bar(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn(f"[bold]{self.label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rate]}"),
        )
        self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, rate="")
        self._bar.start()

    def update(self, n: int) -> None:
        """``n`` more items are done."""
        self.set(self.done + n)

    def set(self, done: int, total: int | None = None) -> None:
        """``done`` items of ``total`` (or of the total known so far) are done."""
        if total is not None:
            self.total = total
        self.done = done
        if self.mode == "off" or not self.total:
            return
        now = time.perf_counter()
        rate = (self.done - self.start) / max(now - self.t0, 1e-9)
        if self.mode == "rich":
            if self._bar is None:
                self._start_bar()
            self._bar.update(self._task, total=self.total, completed=self.done, rate=f"{rate:.0f} img/s")
        elif self.last is None or now - self.last >= self.every or self.done >= self.total:
            self.last = now
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"{self.label}: {self.done}/{self.total} ({100 * self.done / self.total:.1f}%), {rate:.0f} img/s, "
                  f"eta {eta / 60:.1f} min", flush=True)  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
