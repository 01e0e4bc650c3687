"""The end-to-end GPU benchmark (``benchmarks/gpu_throughput.py --e2e``) runs every row in its CPU smoke mode
and writes a table whose numbers hang together. On a GPU the same script produces the measured table
(``bash benchmarks/gpu_check.sh``); here it must only prove that nothing in it is broken."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = ["ceiling", "plain", "online", "bare_teacher", "cpu_few", "gpu_few", "auto_few", "decode_gpu",
        "trainer_synthetic", "embed_cache", "cached", "online_eager", "ceiling_teacher", "plain_nopfc"]  # fmt: skip
TRAINING = {"plain", "online", "cached", "cpu_few", "auto_few", "online_eager", "plain_nopfc", "trainer_synthetic"}


@pytest.mark.slow
def test_e2e_benchmark_cpu_smoke_writes_a_consistent_table(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--e2e", "--cpu-smoke", "--out", str(out),
           "--work", str(work), "--budget-s", "1500"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1700)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]

    data = json.loads((out / "gpu_e2e.json").read_text())
    header, rows = data["header"], {r["name"]: r for r in data["rows"]}
    assert list(rows) == ROWS
    assert header["gpu"].startswith("none") and header["torch"] and header["cpus"]
    assert {n for n, r in rows.items() if r["status"] != "ok"} == {"decode_gpu", "gpu_few"}
    assert all(rows[n]["status"] == "n/a" and "no CUDA" in rows[n]["note"] for n in ("decode_gpu", "gpu_few"))

    batch = 4  # the smoke settings (16 images, batch 4, 2 steps)
    for name in TRAINING | {"ceiling", "ceiling_teacher"}:
        r = rows[name]
        assert math.isfinite(r["img_per_s"]) and r["img_per_s"] > 0, name
        assert r["step_ms"] == pytest.approx(batch / r["img_per_s"] * 1e3, rel=1e-6), name
    for name in TRAINING - {"trainer_synthetic"}:  # read from metrics.jsonl: the one window after step 1
        assert rows[name]["extra"]["steps_measured"] == 1, name
    assert rows["embed_cache"]["img_per_s"] > 0 and (work / "cache.tfemb").exists()

    bare = rows["bare_teacher"]["extra"]
    timings = {k: v for k, v in bare.items() if k != "best_ms"}
    assert set(timings) == {"NCHW fp32", "channels-last fp32", "TeacherWrapper (fp32, channels-last, eager)"}
    assert all(isinstance(v, float) and v > 0 for v in timings.values()) and bare["best_ms"] == min(timings.values())

    targets = {t[0]: t for t in data["targets"]}
    plain, ceiling, online = rows["plain"]["img_per_s"], rows["ceiling"]["img_per_s"], rows["online"]["img_per_s"]
    assert targets["end-to-end >= 0.90 x the ceiling"][1] == f"{plain / ceiling:.3f}"
    assert targets["online >= 0.75 x plain"][1] == f"{online / plain:.3f}"
    cost = (rows["online"]["step_ms"] - rows["plain"]["step_ms"]) / bare["best_ms"]
    assert targets["(online step - plain step) <= 1.2 x best bare teacher forward"][1] == f"{cost:.2f}x"
    assert all(t[2] == "smoke run: not a measurement" for t in data["targets"])

    table = (out / "gpu_e2e.md").read_text()
    assert "- gpu: none (CPU smoke run)" in table and "- torch: " in table and "- cpus: " in table
    starts = tuple(f"| {n} |" for n in ROWS)
    assert [line.split(" | ")[0][2:] for line in table.splitlines() if line.startswith(starts)] == ROWS
    assert all((out / "logs" / f"{n}.log").is_file() for n in ROWS if rows[n]["status"] == "ok")
