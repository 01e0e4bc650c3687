"""``timmface report`` and ``write_report``: the plot and the summary of a hand-written ``metrics.jsonl``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from timmface.cli import main
from timmface.report import summarise_run, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TRAIN = [  # step, loss, margin, kd, lr, img_per_s
    (10, 9.0, 8.0, 1.0, 1e-3, 50.0),
    (20, 7.0, 6.2, 0.8, 9e-4, 200.0),
    (30, 6.0, 5.4, 0.6, 7e-4, 210.0),
    (40, 5.0, 4.6, 0.4, 4e-4, 190.0),
    (50, 4.5, 4.2, 0.3, 1e-4, 200.0),
]
EVALS = {  # step -> (lfw, cfp_fp)
    20: (0.95, 0.80),
    40: (0.97, 0.85),
    50: (0.96, 0.86),
}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for step, loss, margin, kd, lr, ips in TRAIN:
        lines.append({"step": step, "loss": loss, "margin": margin, "kd": kd, "lr": lr, "img_per_s": ips,
                      "grad_norm": 2.0, "norm_mean": 10.0, "epoch": step / 100, "data/bad_records": 0})  # fmt: skip
        if step in EVALS:
            lfw, cfp = EVALS[step]
            lines.append({"step": step, "acc/lfw": lfw, "acc_std/lfw": 0.01, "acc/cfp_fp": cfp, "acc_std/cfp_fp": 0.02})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 60, "loss": 4.'  # a line cut short by a crash
    (run / "metrics.jsonl").write_text(text)
    (run / "config.yaml").write_text(
        "batch_size: 100\ntotal_steps: 50\nmodel:\n  backbone: test_vit\nloss:\n  name: cosface\n"
    )
    return run


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


def test_report_cli_writes_the_plot_and_the_summary(run: Path, capsys):
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    width, height = _png_size(run / "report.png")
    assert width > 600 and height > 600 and (run / "report.png").stat().st_size > 20_000

    lines = out.splitlines()
    assert any("test_vit, cosface, batch 100" in line for line in lines)
    assert "last step 50 of 50" in out
    assert "last losses (step 50): loss 4.5  margin 4.2  kd 0.3\n" in out  # the learning rate is not a loss
    assert "learning rate (step 50): 0.0001" in out
    # mean img/s without the first (start-up) window: (200 + 210 + 190 + 200) / 4
    assert "throughput: 200.0 img/s mean over 4 log windows" in out
    # time from throughput: 100 images/step x 10 steps / img_per_s per window = 20 + 5 + 4.76 + 5.26 + 5 = 40.03 s
    assert "time: 0:00:40 (from throughput)" in out
    lfw = next(line for line in lines if line.strip().startswith("lfw"))
    cfp = next(line for line in lines if line.strip().startswith("cfp_fp"))
    assert lfw.split() == ["lfw", "97.00", "±", "1.00", "40", "96.00", "±", "1.00", "50"]  # best 97 at 40, last 96
    assert cfp.split() == ["cfp_fp", "86.00", "±", "2.00", "50", "86.00", "±", "2.00", "50"]


def test_write_report_for_the_trainer(run: Path):
    report = write_report(run)
    assert report.plot == run / "report.png" and _png_size(report.plot)[0] > 0 and report.note is None
    summary = (run / "report.txt").read_text()
    assert "97.00 ± 1.00" in summary and summary.endswith("\n") and summary == report.summary + "\n"
    assert write_report(run / "missing") is None


def test_summary_without_evaluations_or_config():
    records = [{"step": 5, "loss": 1.0, "img_per_s": 10.0}]
    text = summarise_run(records)
    assert "last step 5" in text and "verification accuracy: none logged" in text and "time: unknown" in text


def test_a_folder_without_metrics_is_one_line(tmp_path: Path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no metrics.jsonl" in err and "\n" not in err
