"""``report.txt`` is always written (by a run and by ``timmface report``); a skipped plot is said once, with how to
get it; the summary keeps the learning rate out of the losses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_run_args, write_toy_dataset
from tests.test_report import run  # noqa: F401  (the hand-written metrics.jsonl fixture)
from timmface.cli import main
from timmface.report import summarise_run, write_report

PLOT_HINT = 'pip install -e ".[plot]"'


def _without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    for name in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)


def test_summary_lists_losses_apart_from_the_learning_rate(run: Path):  # noqa: F811
    from timmface.report import load_run_metrics

    text = summarise_run(*load_run_metrics(run), run)
    losses = next(line for line in text.splitlines() if line.startswith("last losses"))
    assert losses == "last losses (step 50): loss 4.5  margin 4.2  kd 0.3"
    assert "learning rate (step 50): 0.0001" in text.splitlines()


def test_write_report_without_matplotlib_writes_the_text(run: Path, monkeypatch):  # noqa: F811
    _without_matplotlib(monkeypatch)
    report = write_report(run)
    assert report.text == run / "report.txt" and report.plot is None
    assert "97.00 ± 1.00" in (run / "report.txt").read_text() and not (run / "report.png").exists()
    assert PLOT_HINT in report.note


@pytest.mark.parametrize("matplotlib", [True, False])
def test_report_command_writes_report_txt(matplotlib: bool, run: Path, monkeypatch, capsys):  # noqa: F811
    if not matplotlib:
        _without_matplotlib(monkeypatch)
    assert main(["report", str(run)]) == 0
    captured = capsys.readouterr()
    summary = (run / "report.txt").read_text()
    assert summary.endswith("\n") and "last losses (step 50)" in summary and summary.strip() in captured.out
    assert (run / "report.png").exists() == matplotlib
    assert (PLOT_HINT in captured.err) != matplotlib


def test_a_run_without_matplotlib_writes_report_txt_and_says_once_how_to_get_the_plot(
    tmp_path: Path, monkeypatch, capsys
):
    _without_matplotlib(monkeypatch)
    data = write_toy_dataset(tmp_path / "toy", num_classes=4, per_class=4)
    out = tmp_path / "run"
    assert main(["train", *tiny_run_args(data, out)]) == 0
    captured = capsys.readouterr()
    said = (captured.out + captured.err).count(PLOT_HINT)
    assert said == 1
    assert (out / "report.txt").is_file() and not (out / "report.png").exists()
    assert "last step 6 of 6" in (out / "report.txt").read_text()
