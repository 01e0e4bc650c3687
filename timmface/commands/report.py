"""``timmface report RUN``: a one-screen summary of ``metrics.jsonl`` (``RUN/report.txt``) and a PNG of its curves."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="run directory (holding metrics.jsonl)")
    parser.add_argument("--out", metavar="PNG", help="where to write the plot (default: RUN/report.png)")
    parser.add_argument("--no-plot", action="store_true", help="write and print the summary only (RUN/report.txt)")


def run(args: argparse.Namespace) -> int:
    from timmface.errors import DataError
    from timmface.report import load_run_metrics, write_report

    run_dir = Path(args.run_dir)
    if run_dir.is_file():  # RUN/metrics.jsonl
        run_dir = run_dir.parent
    try:
        report = write_report(run_dir, plot=not args.no_plot, png=args.out)
    except OSError as e:
        raise DataError(f"{run_dir}: cannot write the report ({e.strerror or type(e).__name__})") from None
    if report is None:
        load_run_metrics(run_dir)  # no (readable) metrics: raises the one-line error that says so
        return 2
    print(report.summary)
    print(f"summary written to {report.text}")
    if report.plot is not None:
        print(f"plot written to {report.plot}")
    if report.note:
        print(f"note: {report.note}", file=sys.stderr)
    return 0
