"""``timmface report RUN``: a PNG of the run's curves and a one-screen summary of ``metrics.jsonl``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="run directory (holding metrics.jsonl)")
    parser.add_argument("--out", metavar="PNG", help="where to write the plot (default: RUN/report.png)")
    parser.add_argument("--no-plot", action="store_true", help="print the summary only")


def run(args: argparse.Namespace) -> int:
    from timmface.report import load_run_metrics, plot_metrics, summarise_run

    run_dir = Path(args.run_dir)
    records, config = load_run_metrics(run_dir)
    print(summarise_run(records, config, run_dir))
    if args.no_plot:
        return 0
    out = Path(args.out) if args.out else run_dir / "report.png"
    try:
        plot_metrics(records, out, title=str(run_dir))
    except ImportError:
        print("note: no plot written: it needs matplotlib (pip install 'timmface[plot]')", file=sys.stderr)
        return 0
    print(f"plot written to {out}")
    return 0
