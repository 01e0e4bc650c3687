"""A week-long run survives faults: each test injects one and asserts the outcome, not just "no crash".

* kill -9 at any moment -- at a random step and inside a checkpoint write (half-written temporary file,
  complete but not renamed, renamed but older ones not pruned) -- then ``resume=auto``: the same final
  weights and per-step losses as an uninterrupted run, and no checkpoint ever half-written or unreadable;
* a full disk while saving: the previous checkpoint intact, one line naming the file and the reason;
* a non-finite loss: skipped and counted up to ``max_nonfinite`` or stopped, naming the step and the last
  good checkpoint; fp16 grad-scaler overflows are not counted;
* corrupt records mid-run: skipped and counted, counts and the first bad key surviving resume (records
  whose framing disagrees with train.idx stop the run at once: ``tests/test_pipeline.py``);
* a DDP rank that dies or stops answering: the others end with a message; torchrun restarts the group and
  the run finishes with the uninterrupted run's weights.

Real kills run the real CLI in a subprocess (``TIMMFACE_FAULT``, see ``timmface/faults.py``, places them
exactly); the rest run in-process with monkeypatching. Everything is CPU, ``deterministic=true``, fixed seed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_run_args
from tests.test_distributed import _free_port, spawn
from tests.test_trainer import _corrupt_one_jpeg
from timmface import checkpoint as ckpt_module
from timmface.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, shard_path
from timmface.cli import main
from timmface.config import load_config
from timmface.errors import CheckpointError, TimmfaceError
from timmface.faults import ENV
from timmface.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_run_args(data, out, "eval_every=0", "deterministic=true", "log.progress=plain", *extra)


def _metrics(run: Path) -> dict[int, dict[str, Any]]:
    """Training records by step; numbers as floats (metrics.jsonl writes NaN and inf as strings)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    num = lambda v: float(v) if isinstance(v, str) and v in ("nan", "inf", "-inf") else v  # noqa: E731
    return {m["step"]: {k: num(v) for k, v in m.items()} for m in lines if "loss" in m}


def _steps(run: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(run)]


def _assert_all_checkpoints_load(run: Path) -> None:
    """Every ``step_*.pt`` (main and rank files) under its real name is complete: weights-only loadable."""
    for path in sorted((run / "checkpoints").glob("step_*.pt")):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        assert obj["format"] == "timmface" and path.name.startswith(f"step_{obj['step']:08d}"), path


def _temporaries(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob(".*tmp*"))


def _assert_same_state(a: Path, b: Path) -> None:
    """Two checkpoints hold the same weights, EMA and optimiser state, bit for bit."""
    x, y = load_checkpoint(a), load_checkpoint(b)
    for key in ("model", "head", "ema"):
        assert x[key].keys() == y[key].keys(), key
        for k in x[key]:
            assert torch.equal(x[key][k], y[key][k]), f"{key}.{k}"
    for i, state in x["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, y["optimizer"]["state"][i][k]), f"optimizer.{i}.{k}"


def _one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip() and "Warning" not in x and "warnings.warn" not in x]
    assert len(lines) == 1, lines
    return lines[0]


# --------------------------------------------------------------------------------------------------
# kill -9 at any moment, then resume=auto
# --------------------------------------------------------------------------------------------------


def _start(args: list[str], log: Path, fault: str | None = None) -> subprocess.Popen:
    """``timmface train ARGS`` as a real process (one thread, like a rank on a busy machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    cmd = [sys.executable, "-m", "timmface.cli", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _run_killed(args: list[str], log: Path, fault: str) -> str:
    proc = _start(args, log, fault)
    assert proc.wait(120) == -signal.SIGKILL, log.read_text()[-3000:]
    return log.read_text()


def _last_logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_auto(toy_data: Path, tmp_path: Path) -> None:
    extra = ["total_steps=16", "save_every=2", "keep_last=2"]
    reference = _start(_args(toy_data, tmp_path / "reference", *extra), tmp_path / "reference.log")
    run = tmp_path / "run"
    args = _args(toy_data, run, *extra, "resume=auto")
    resumed = "resumed from {} at step {}"

    # 1. killed half-way through writing step 4 (its temporary file cut to half): step 2 stays the newest
    _run_killed(args, tmp_path / "1.log", "truncate@checkpoint.written:name=step_00000004.pt")
    (partial,) = _temporaries(run)
    assert partial.name.startswith(".step_00000004.pt.tmp") and _steps(run) == [2]
    with pytest.raises(Exception):  # noqa: B017  (the cut file is garbage to torch, whatever it raises)
        torch.load(partial, weights_only=True)
    _assert_all_checkpoints_load(run)

    # 2. killed after step 8's temporary file is complete and synced, before its rename
    log = _run_killed(args, tmp_path / "2.log", "kill@checkpoint.written:name=step_00000008.pt")
    assert resumed.format(checkpoint_path(run, 2), 2) in log
    assert not partial.exists()  # a dead process's temporary file is removed by the next save
    (complete,) = _temporaries(run)
    assert complete.name.startswith(".step_00000008.pt.tmp") and _steps(run) == [4, 6]
    _assert_all_checkpoints_load(run)

    # 3. killed after step 10 is renamed into place, before the old ones are pruned
    log = _run_killed(args, tmp_path / "3.log", "kill@checkpoint.renamed:name=step_00000010.pt")
    assert resumed.format(checkpoint_path(run, 6), 6) in log
    assert _steps(run) == [6, 8, 10]  # keep_last=2 is applied only after a new checkpoint is complete
    _assert_all_checkpoints_load(run)

    # 4. kill -9 from outside at a random moment after step 10 (mid-step, mid-save, mid-log...)
    rng = random.Random()
    target, delay = rng.randint(11, 13), rng.uniform(0.0, 0.06)
    proc = _start(args, tmp_path / "4.log")
    deadline = time.time() + 120
    while _last_logged_step(run) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    where = f"(killed after step {target} + {delay:.3f} s)"
    assert proc.wait(60) == -signal.SIGKILL, f"the run ended before the kill {where}"
    assert resumed.format(checkpoint_path(run, 10), 10) in (tmp_path / "4.log").read_text(), where
    _assert_all_checkpoints_load(run)

    # 5. resume to the end: the uninterrupted run's weights and losses, nothing half-written left behind
    proc = _start(args, tmp_path / "5.log")
    assert proc.wait(120) == 0, (tmp_path / "5.log").read_text()[-3000:]
    assert reference.wait(120) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert _steps(run) == [14, 16] and not _temporaries(run), where
    _assert_all_checkpoints_load(run)
    _assert_same_state(checkpoint_path(run, 16), checkpoint_path(tmp_path / "reference", 16))
    got, want = _metrics(run), _metrics(tmp_path / "reference")
    assert sorted(got) == list(range(1, 17))
    assert [got[s]["loss"] for s in got] == [want[s]["loss"] for s in got], where


def test_stale_temporary_files_are_removed_even_when_their_pid_is_reused(tmp_path: Path) -> None:
    """A container restarted after a kill hands out the same PIDs again: a temporary file of a step that is
    already complete is removed whoever's PID it carries; one of a newer step from a live process is kept."""
    from timmface.checkpoint import save_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = [folder / f".step_00000002.pt.tmp{os.getpid()}", folder / f".step_00000004.shard1of2.pt.tmp{os.getppid()}"]
    dead = folder / ".step_00000009.pt.tmp999999999"  # a newer step, but its writer is gone
    live = folder / f".step_00000009.pt.tmp{os.getppid()}"  # a newer step being written by a live process
    for p in [*stale, dead, live]:
        p.write_bytes(b"partial")
    save_checkpoint({"model": {}}, tmp_path, 4, keep_last=2)
    assert _temporaries(tmp_path) == [live] and _steps(tmp_path) == [4]


# --------------------------------------------------------------------------------------------------
# A full disk while saving
# --------------------------------------------------------------------------------------------------


class _FullDisk:
    """A file that accepts ``room`` bytes, then fails every write with ENOSPC (as a full disk does)."""

    def __init__(self, f: Any, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            self.f.write(memoryview(data).cast("B")[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(data)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _fill_disk_at(monkeypatch: pytest.MonkeyPatch, name: str, how: str) -> None:
    """Make the write of checkpoint file ``name`` fail with ENOSPC: in the file's write, or in torch.save."""
    if how == "write":
        real_open = open

        def full_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            f = real_open(path, mode, *args, **kwargs)
            return _FullDisk(f, room=700) if "w" in mode and Path(path).name.startswith(f".{name}.tmp") else f

        monkeypatch.setattr(ckpt_module, "open", full_open, raising=False)
    else:
        real_save = torch.save

        def full_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            target = getattr(getattr(f, "f", f), "name", "")
            if Path(str(target)).name.startswith(f".{name}.tmp"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(ckpt_module.torch, "save", full_save)


@pytest.mark.parametrize("how", ["write", "torch.save"])
def test_disk_full_during_save_keeps_the_previous_checkpoint(
    toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, how: str
) -> None:
    run = tmp_path / "run"
    args = _args(toy_data, run, "total_steps=6", "save_every=2")
    target = checkpoint_path(run, 4)
    _fill_disk_at(monkeypatch, target.name, how)
    capsys.readouterr()
    assert main(["train", *args]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"timmface train: error: {target}: could not write checkpoint"), line
    assert "No space left on device" in line
    assert _steps(run) == [2] and not target.exists() and not _temporaries(run)
    assert load_checkpoint(checkpoint_path(run, 2))["step"] == 2
    _assert_all_checkpoints_load(run)
    monkeypatch.undo()  # space again: the run continues from the intact checkpoint
    assert main(["train", *args, "resume=auto"]) == 0
    assert f"resumed from {checkpoint_path(run, 2)}" in capsys.readouterr().out and _steps(run)[-1] == 6


def _ddp_disk_full(rank: int, world: int, args: list[str], name: str) -> str:
    """Rank 1's disk is full when it writes its rank file of step 4; returns each rank's error."""
    mp = pytest.MonkeyPatch()
    if rank == 1:
        _fill_disk_at(mp, name, "write")
    try:
        Trainer(load_config(None, args)).fit()
    except CheckpointError as e:
        return str(e)
    finally:
        mp.undo()
    return ""


@pytest.mark.multiprocess
def test_disk_full_on_one_rank_stops_every_rank(toy_data: Path, tmp_path: Path) -> None:
    """The rank that cannot write names its file; the other stops at once (no wait for dist_timeout)."""
    run = tmp_path / "run"
    args = _args(toy_data, run, "total_steps=6", "save_every=2", "dist_timeout=600", "log.progress='off'")
    shard = shard_path(run, 4, 1, 2)
    r0, r1 = spawn(_ddp_disk_full, 2, args, shard.name, tmp=tmp_path)
    assert r1.startswith(f"{shard}: could not write checkpoint") and "No space left on device" in r1
    assert r0.startswith(f"{checkpoint_path(run, 4)}: another rank could not write its part"), r0
    assert _steps(run) == [2] and not checkpoint_path(run, 4).exists() and not _temporaries(run)


# --------------------------------------------------------------------------------------------------
# Non-finite losses; fp16 overflows
# --------------------------------------------------------------------------------------------------


def _poison(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The loss of these optimiser steps (1-based) becomes NaN, after a normal forward and backward graph."""
    real = Trainer._forward

    def forward(self: Trainer, x: Any, labels: Any, targets: Any) -> dict[str, Any]:
        out = real(self, x, labels, targets)
        if self.step + 1 in steps:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Trainer, "_forward", forward)


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def test_nonfinite_loss_is_skipped_counted_and_logged(
    toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _poison(monkeypatch, {3, 5})
    t = Trainer(load_config(None, _args(toy_data, tmp_path / "r", "total_steps=8", "max_nonfinite=5")))
    t.fit(until=2)
    before, adam_step = _weights(t), float(next(iter(t.optimizer.state.values()))["step"])
    t.fit(until=3)  # step 3 is poisoned: nothing moves
    after = _weights(t)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert float(next(iter(t.optimizer.state.values()))["step"]) == adam_step
    t.fit()
    assert "warning: non-finite loss at step 3: step skipped" in capsys.readouterr().out
    m = _metrics(tmp_path / "r")
    assert [m[s]["nonfinite_skipped"] for s in range(1, 9)] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert math.isnan(m[3]["loss"]) and m[3]["skipped"] == 1 and math.isnan(m[5]["loss"])
    assert all(math.isfinite(m[s]["loss"]) for s in (1, 2, 4, 6, 7, 8))
    assert load_checkpoint(checkpoint_path(tmp_path / "r", 8))["counters"]["nonfinite"] == 2


def test_too_many_nonfinite_losses_stop_naming_step_and_checkpoint(
    toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _poison(monkeypatch, set(range(3, 20)))
    run = tmp_path / "r"
    assert main(["train", *_args(toy_data, run, "total_steps=8", "save_every=2", "max_nonfinite=2")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "non-finite loss at step 5 (3 so far; nonfinite=skip, max_nonfinite=2)" in line, line
    assert line.endswith(f"last good checkpoint: {checkpoint_path(run, 4)}")
    assert _steps(run) == [2, 4]


def test_nonfinite_stop_policy(
    toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _poison(monkeypatch, {3})
    run = tmp_path / "r"
    assert main(["train", *_args(toy_data, run, "total_steps=8", "save_every=2", "nonfinite=stop")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "non-finite loss at step 3 (1 so far; nonfinite=stop" in line, line
    assert line.endswith(f"last good checkpoint: {checkpoint_path(run, 2)}") and _steps(run) == [2]
    _poison(monkeypatch, {1})
    assert main(["train", *_args(toy_data, tmp_path / "r1", "nonfinite=stop")]) == 2
    assert _one_line(capsys.readouterr().err).endswith("non-finite loss at step 1 (1 so far; nonfinite=stop, "
                                                       "max_nonfinite=10); no checkpoint yet")  # fmt: skip


def test_nonfinite_budget_spans_resume(toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, {2, 6})
    args = _args(toy_data, tmp_path / "r", "total_steps=8", "save_every=2", "max_nonfinite=1")
    Trainer(load_config(None, args)).fit(until=4)
    second = Trainer(load_config(None, [*args, "resume=auto"]))
    assert second.counters["nonfinite"] == 1
    with pytest.raises(TimmfaceError, match=r"non-finite loss at step 6 \(2 so far"):
        second.fit()
    assert _metrics(tmp_path / "r")[5]["nonfinite_skipped"] == 1  # logged after the resume, counted before it


def test_fp16_overflow_is_not_a_nonfinite_loss(toy_data: Path, tmp_path: Path) -> None:
    """amp=float16 on CPU: a gradient overflow with a finite loss makes GradScaler skip the step and lower its
    scale; the run goes on and nothing is counted as non-finite. (The first steps overflow by themselves,
    from the initial scale 2**16; an inf is then injected into one gradient at a step whose scale has settled.)"""
    t = Trainer(load_config(None, _args(toy_data, tmp_path / "r", "amp=float16", "total_steps=20")))
    t.fit(until=10)
    m = _metrics(tmp_path / "r")
    assert any(not math.isfinite(m[s]["grad_norm"]) for s in m)  # natural overflows at the start...
    assert all(math.isfinite(m[s]["loss"]) and m[s]["nonfinite_skipped"] == 0 for s in m)  # ...not counted
    assert t.scaler.is_enabled() and t.scaler.get_scale() < 2.0**16

    before, scale = _weights(t), t.scaler.get_scale()
    param = next(t.model.backbone.parameters())
    hook = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    t.fit(until=11)
    hook.remove()
    after = _weights(t)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("head.loss"))
    assert t.scaler.get_scale() == scale / 2 and t.counters["nonfinite"] == 0
    step11 = _metrics(tmp_path / "r")[11]
    assert math.isfinite(step11["loss"]) and not math.isfinite(step11["grad_norm"]) and "skipped" not in step11
    t.fit()
    assert t.step == 20 and t.counters["nonfinite"] == 0
    assert any(not torch.equal(after[k], v) for k, v in _weights(t).items())  # and it trains on


# --------------------------------------------------------------------------------------------------
# Corrupt records mid-run
# --------------------------------------------------------------------------------------------------


def test_bad_record_counts_and_first_key_survive_resume(toy_data: Path, tmp_path: Path, capsys) -> None:
    """Two undecodable records per epoch; the limit trips at the 4th one met, in the second epoch. A run resumed
    after the first epoch logs the same counts and stops at the same step naming the same first bad record
    (met before the resume: the second epoch meets the other one first) as the uninterrupted run."""
    _corrupt_one_jpeg(toy_data, tmp_path / "bad1", key=5)
    _corrupt_one_jpeg(tmp_path / "bad1", tmp_path / "bad", key=31)
    bad = tmp_path / "bad"
    extra = ["total_steps=12", "save_every=3", "data.max_bad_fraction=0.0035"]  # counted over >= 1000 records
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["train", *_args(bad, whole, *extra)]) == 2
    want = _one_line(capsys.readouterr().err)
    Trainer(load_config(None, _args(bad, part, *extra))).fit(until=6)  # a job that ends after one epoch
    assert main(["train", *_args(bad, part, *extra), "resume=auto"]) == 2
    got = _one_line(capsys.readouterr().err)
    assert got == want and "4 of" in got and "first bad record: key" in got, (got, want)
    counts = {s: m["data/bad_records"] for s, m in _metrics(part).items()}
    assert counts == {s: m["data/bad_records"] for s, m in _metrics(whole).items()} and counts[6] == 2


# --------------------------------------------------------------------------------------------------
# DDP: a rank that dies or stops answering
# --------------------------------------------------------------------------------------------------


def _torchrun(args: list[str], log: Path, fault: str | None = None, restarts: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{_free_port()}", f"--max-restarts={restarts}", "-m", "timmface.cli",
           "train", *args]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_job(toy_data: Path, tmp_path: Path) -> None:
    """Rank 1 hangs after step 3 (a stuck filesystem, a deadlock); rank 0's next collective times out after
    ``dist_timeout`` and it stops with one line saying a rank stopped answering; torchrun then ends rank 1."""
    run = tmp_path / "run"
    args = _args(toy_data, run, "total_steps=40", "save_every=2", "dist_timeout=5", "log.progress='off'")
    proc = _torchrun(args, tmp_path / "log", fault="hang@train.step:step=3:rank=1")
    try:
        code = proc.wait(180)  # a hang here is the failure this test is about
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "log").read_text()
    assert code != 0 and "TIMMFACE_FAULT: hang at train.step" in log
    assert "timmface train: error: rank 0: another rank stopped answering after step 3" in log, log[-3000:]
    assert "dist_timeout=5 s" in log and _steps(run) == [2]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_the_run_finishes(toy_data: Path, tmp_path: Path) -> None:
    """SIGKILL of rank 1 after step 5; torchrun (--max-restarts=1) restarts both ranks, resume=auto continues
    from step 4, and the final weights and every step's loss equal an uninterrupted 2-rank run."""
    extra = ["total_steps=12", "save_every=2", "dist_timeout=60", "log.progress='off'"]
    whole = _torchrun(_args(toy_data, tmp_path / "whole", *extra), tmp_path / "whole.log")
    killed = _torchrun(
        _args(toy_data, tmp_path / "run", *extra, "resume=auto"), tmp_path / "run.log",
        fault="kill@train.step:step=5:rank=1:restart=0", restarts=1,
    )  # fmt: skip
    assert killed.wait(180) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert whole.wait(180) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    log = (tmp_path / "run.log").read_text()
    assert "TIMMFACE_FAULT: kill at train.step" in log and "exitcode: -9" in log
    assert f"resumed from {checkpoint_path(tmp_path / 'run', 4)} at step 4" in log
    _assert_all_checkpoints_load(tmp_path / "run")
    _assert_same_state(checkpoint_path(tmp_path / "run", 12), checkpoint_path(tmp_path / "whole", 12))
    got, want = _metrics(tmp_path / "run"), _metrics(tmp_path / "whole")
    assert sorted(got) == list(range(1, 13)) and [got[s]["loss"] for s in got] == [want[s]["loss"] for s in got]


def test_atomic_write_leaves_the_old_file_on_error(tmp_path: Path) -> None:
    """The helper behind write_bin, write_shards and the index cache: all or nothing, readable by all."""
    from timmface.fileio import atomic_write

    path = tmp_path / "lfw.bin"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            raise OSError("disk full")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["lfw.bin"]
    with atomic_write(path, hidden=True) as f:
        f.write(b"new")
        (temporary,) = [p.name for p in tmp_path.iterdir() if p.name != "lfw.bin"]
        assert temporary.startswith(".lfw.bin.") and temporary.endswith(".tmp") and path.read_bytes() == b"old"
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lfw.bin"]
