"""A run at a glance: curves of ``metrics.jsonl`` as a PNG, and a one-screen text summary.

The trainer logs one JSON object per line: training windows (``loss`` and its terms, ``lr``, ``img_per_s``,
``grad_norm``, ...) every ``log.every`` steps and evaluations (``acc/<set>``, ``acc_std/<set>``, ``threshold/<set>``).
Plotting needs matplotlib (the optional extra ``timmface[plot]``); it draws on an Agg canvas and never touches
pyplot's global state, so it is safe inside a training process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timmface.errors import DataError
from timmface.fileio import atomic_path

__all__ = ["PLOT_HINT", "Report", "load_run_metrics", "loss_terms", "plot_metrics", "summarise_run", "write_report"]

# how to get plots (report.png, IJB ROC curves): matplotlib is the optional extra ``plot``
PLOT_HINT = 'needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib)'

# logged values that are not loss terms
_NOT_LOSS = {"step", "lr", "img_per_s", "epoch", "grad_norm", "norm_mean", "nonfinite_skipped", "skipped", "images"}
_NOT_LOSS_PREFIX = ("acc/", "acc_std/", "threshold/", "data/", "time", "elapsed", "distill/", "teacher_acc")
_TIME_KEYS = ("elapsed", "elapsed_s", "time", "wall_time")


def load_run_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(records of metrics.jsonl, the run's config.yaml as a dict or {})``; DataError without metrics."""
    import yaml

    from timmface.metrics import read_metrics

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (not a run directory, or nothing logged yet)")
    records = [r for r in read_metrics(path) if isinstance(r, dict) and isinstance(r.get("step"), int)]
    if not records:
        raise DataError(f"{path}: holds no metric records")
    config: dict[str, Any] = {}
    cfg_path = path.parent / "config.yaml"
    if cfg_path.is_file():
        try:
            loaded = yaml.safe_load(cfg_path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            config = {}
    return records, config


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in records if _number(r.get(key))]
    return [s for s, _ in pts], [v for _, v in pts]


def loss_terms(records: list[dict[str, Any]]) -> list[str]:
    """The logged loss terms (``loss`` first, then ``margin``, distillation terms, ...) in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        if "loss" not in r:
            continue
        for k, v in r.items():
            if k in _NOT_LOSS or k.startswith(_NOT_LOSS_PREFIX) or not _number(v):
                continue
            seen.setdefault(k, None)
    return sorted(seen, key=lambda k: (k != "loss", k != "margin"))


def _acc_sets(records: list[dict[str, Any]]) -> list[str]:
    return sorted({k[4:] for r in records for k in r if k.startswith("acc/")})


def _train_windows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if _number(r.get("img_per_s"))]


def _total_seconds(records: list[dict[str, Any]], config: dict[str, Any]) -> tuple[float | None, str]:
    """Wall time if logged, else the sum over log windows of (images in the window / img_per_s) -- which includes
    the evaluations and saves that ran inside those windows, not start-up."""
    for key in _TIME_KEYS:
        values = [float(r[key]) for r in records if _number(r.get(key))]
        if values:
            return max(values), "logged"
    batch = config.get("batch_size")
    windows = _train_windows(records)
    if not _number(batch) or not windows:
        return None, ""
    total, prev = 0.0, 0
    for r in sorted(windows, key=lambda r: r["step"]):
        if r["img_per_s"] > 0:
            total += batch * (r["step"] - prev) / r["img_per_s"]
        prev = r["step"]
    return total, "from throughput"


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def summarise_run(records: list[dict[str, Any]], config: dict[str, Any] | None = None, run_dir: str | Path = "") -> str:
    """A one-screen text summary: model, steps, last loss, throughput, time, best and last accuracies."""
    from timmface.export import summarise_metrics

    config = config or {}
    model = config.get("model") or {}
    last_step = max(r["step"] for r in records)
    total = config.get("total_steps")
    lines = [f"run {run_dir}" if run_dir else "run"]
    if model:
        loss = (config.get("loss") or {}).get("name", "?")
        lines[0] += f": {model.get('backbone')}, {loss}, batch {config.get('batch_size', '?')}"
    lines.append(f"last step {last_step}" + (f" of {total}" if _number(total) else ""))
    train = [r for r in records if _number(r.get("loss"))]
    if train:
        last = train[-1]
        terms = "  ".join(f"{k} {last[k]:.4g}" for k in loss_terms(records) if _number(last.get(k)))
        lines.append(f"last losses (step {last['step']}): {terms}")
        if _number(last.get("lr")):
            lines.append(f"learning rate (step {last['step']}): {last['lr']:.3g}")
        if _number(last.get("distill/cos_st")):  # how close the student is to its teacher
            lines.append(f"student-teacher cosine (step {last['step']}): {last['distill/cos_st']:.4f}")
    windows = _train_windows(records)
    if windows:
        steady = windows[1:] if len(windows) > 1 else windows  # the first window holds start-up and compilation
        mean = sum(r["img_per_s"] for r in steady) / len(steady)
        note = " (first window, start-up, excluded)" if len(windows) > 1 else ""
        lines.append(f"throughput: {mean:.1f} img/s mean over {len(steady)} log windows{note}")
    seconds, how = _total_seconds(records, config)
    lines.append(f"time: {_hms(seconds)} ({how})" if seconds is not None else "time: unknown")
    summary = summarise_metrics(records)
    if summary:
        flip = bool(config.get("eval_flip", True))
        protocol = "insightface 10-fold, " + ("Accuracy-Flip" if flip else "no flip")
        lines.append(f"verification accuracy (%, {protocol}):")
        width = max(len(n) for n in summary)
        teacher = _teacher_accuracies(records)  # distillation: the teacher on the same sets, beside the student
        head = f"  {'set':<{width}}  {'best':>15}  {'at step':>8}  {'last':>15}  {'at step':>8}"
        lines.append(head + (f"  {'teacher':>15}" if teacher else ""))
        for name, s in sorted(summary.items()):

            def fmt(v: float, std: Any) -> str:
                return f"{100 * v:.2f}" + (f" ± {100 * std:.2f}" if _number(std) else "")

            row = (
                f"  {name:<{width}}  {fmt(s['best'], s.get('best_std')):>15}  {s['best_step']:>8}  "
                f"{fmt(s['last'], s.get('last_std')):>15}  {s['last_step']:>8}"
            )
            if teacher:
                row += f"  {fmt(*teacher[name]) if name in teacher else '-':>15}"
            lines.append(row)
    else:
        lines.append("verification accuracy: none logged")
    return "\n".join(lines)


def _teacher_accuracies(records: list[dict[str, Any]]) -> dict[str, tuple[float, Any]]:
    """``{set: (accuracy, std)}`` of the distillation teacher (``teacher_acc/<set>``, the latest logged)."""
    out: dict[str, tuple[float, Any]] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith("teacher_acc/") and _number(v):
                name = k[len("teacher_acc/") :]
                out[name] = (float(v), r.get(f"teacher_acc_std/{name}"))
    return out


def plot_metrics(records: list[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Write a PNG with panels for the loss terms, lr, img/s, every ``acc/*``, gradient and embedding norms.

    Raises ImportError when matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    panels: list[tuple[str, list[str], str]] = [("loss terms", loss_terms(records), "")]
    panels += [("learning rate", ["lr"], ""), ("throughput", ["img_per_s"], "img/s")]
    sets = _acc_sets(records)
    panels.append(("verification accuracy", [*(f"acc/{n}" for n in sets), *(f"teacher_acc/{n}" for n in sets)], "%"))
    panels += [("gradient norm", ["grad_norm"], ""), ("mean embedding norm", ["norm_mean"], "")]
    panels.append(("distillation", ["distill/cos_st", "distill/alpha"], ""))
    panels = [p for p in panels if any(_series(records, k)[0] for k in p[1])]
    if not panels:
        raise DataError(f"{out}: nothing to plot (no numeric metrics)")
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.0 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    for i, (name, keys, unit) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key in keys:
            steps, values = _series(records, key)
            if not steps:
                continue
            if unit == "%":
                values = [100 * v for v in values]
            style = "--" if key.startswith("teacher_acc/") else "-"  # the teacher: computed once, a flat reference
            marker = "o" if key.startswith("acc/") else None
            ax.plot(steps, values, linestyle=style, marker=marker, markersize=3, lw=1, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        if unit:
            ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if len(keys) > 1 or unit == "%":  # accuracy panels name their sets even when there is one
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, hidden=True) as tmp:
        fig.savefig(str(tmp), dpi=100, format="png")
    return out


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    text: Path
    """``report.txt``: the summary (always written)."""
    summary: str
    plot: Path | None
    """The PNG, or None when it was not drawn (see ``note``)."""
    note: str | None = None
    """Why the plot is missing and how to get it."""


def write_report(run_dir: str | Path, plot: bool = True, png: str | Path | None = None) -> Report | None:
    """Write ``run_dir/report.txt`` (the summary) and, with ``plot``, the curves to ``png`` (default
    ``run_dir/report.png``).

    The text needs nothing optional; the plot needs matplotlib: without it the PNG is skipped and ``note`` says how
    to get it. Returns None (writing nothing) when the run has logged no metrics yet, so the trainer can call it
    unconditionally at the end of a run.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    try:
        records, config = load_run_metrics(run_dir)
    except DataError:  # an empty or unreadable metrics.jsonl: nothing to report
        return None
    summary = summarise_run(records, config, run_dir)
    with atomic_path(run_dir / "report.txt", hidden=True) as tmp:
        tmp.write_text(summary + "\n", encoding="utf-8")
    report = Report(run_dir / "report.txt", summary, None)
    if plot:
        try:
            report.plot = plot_metrics(records, png or run_dir / "report.png", title=str(run_dir))
        except ImportError:
            report.note = f"{Path(png or run_dir / 'report.png').name} not drawn: it {PLOT_HINT}"
    return report
