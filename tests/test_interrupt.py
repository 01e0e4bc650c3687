"""Ctrl-C and SIGTERM (a pre-empted cluster job): the first signal finishes the step, saves a checkpoint,
says how to resume and exits 130; a second signal exits at once; under DDP every rank stops at the same
step. The resumed run is the uninterrupted one, step for step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_run_args
from tests.test_distributed import spawn
from timmface.checkpoint import checkpoint_path, list_checkpoints
from timmface.cli import main
from timmface.config import load_config
from timmface.faults import ENV
from timmface.stopping import StopRequest
from timmface.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def _signal_during(monkeypatch: pytest.MonkeyPatch, step: int, signum: int, rank: int | None = None) -> None:
    """Send ``signum`` to this process in the middle of optimiser step ``step`` (1-based), on ``rank`` only."""
    real = Trainer.train_step

    def train_step(self: Trainer) -> dict[str, Any]:
        if self.step + 1 == step and (rank is None or self.world.rank == rank):
            os.kill(os.getpid(), signum)
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.fixture
def interactive_sigint() -> Any:
    """SIGINT as an interactive Python has it, whatever the test process inherited (a background job of a
    non-interactive shell starts with SIGINT ignored, and the trainer then leaves it ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_signal_the_process_ignores_stays_ignored() -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = StopRequest(torch.device("cpu"), distributed=False)
        stop.install()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # not taken over
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum is None and not stop.agreed()
        stop.restore()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_saves_the_step_says_how_to_resume_and_exits_130(
    toy_data: Path, tmp_path: Path, monkeypatch, capsys, interactive_sigint
):
    args = tiny_run_args(toy_data, tmp_path / "whole", "total_steps=8", "save_every=0", "eval_every=0")
    assert main(["train", *args]) == 0
    run = tmp_path / "r"
    args = tiny_run_args(toy_data, run, "total_steps=8", "save_every=0", "eval_every=0")
    with monkeypatch.context() as m:
        _signal_during(m, 3, signal.SIGINT)
        capsys.readouterr()
        assert main(["train", *args]) == 130
    out = capsys.readouterr().out
    assert [s for s, _ in list_checkpoints(run)] == [3]  # the step under way was finished and saved
    assert f"checkpoint {checkpoint_path(run, 3)}" in out
    assert f"timmface train --config {run / 'config.yaml'} resume=auto" in out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    # the printed command continues the run to the very same losses
    assert main(["train", "--config", str(run / "config.yaml"), "resume=auto"]) == 0
    assert _losses(run) == _losses(tmp_path / "whole")


def _cli(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen(
        [sys.executable, "-m", "timmface.cli", "train", *args], env=environ,
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _wait_for(predicate: Any, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    return max(_losses(run), default=0) if path.exists() else 0


@pytest.mark.slow
def test_sigterm_to_a_real_process(toy_data: Path, tmp_path: Path):
    """A scheduler's SIGTERM: exit 130 with a complete checkpoint of the step that was under way; a data-loader
    worker is running (it must not die of the signal before the last step has its batches)."""
    run, log = tmp_path / "r", tmp_path / "r.log"
    args = tiny_run_args(toy_data, run, "total_steps=100000", "save_every=0", "eval_every=0", "data.num_workers=1",
                         "optim.grad_accum=2")  # fmt: skip
    proc = _cli(args, log)
    _wait_for(lambda: _last_step(run) >= 3, proc, log)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole job, loader workers included, as SLURM does
    assert proc.wait(120) == 130, log.read_text()[-3000:]
    text = log.read_text()
    (step, path), *_ = list_checkpoints(run)
    assert len(list_checkpoints(run)) == 1 and step >= 3
    assert step == _last_step(run)  # every logged step is in the checkpoint, no step was lost
    assert f"checkpoint {path}" in text and "resume=auto" in text and "SIGTERM" in text
    resumed = Trainer(load_config(None, [*args, "resume=auto"]))
    assert resumed.step == step


@pytest.mark.slow
def test_a_second_signal_exits_at_once(toy_data: Path, tmp_path: Path):
    """The first SIGTERM starts the save (which hangs here), the second ends the process at once."""
    run, log = tmp_path / "r", tmp_path / "r.log"
    args = tiny_run_args(toy_data, run, "total_steps=100000", "save_every=0", "eval_every=0")
    proc = _cli(args, log, **{ENV: "hang@checkpoint.written"})
    _wait_for(lambda: _last_step(run) >= 2, proc, log)
    proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: f"{ENV}: hang" in log.read_text(), proc, log)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM
    assert time.time() - t0 < 10
    assert list_checkpoints(run) == []  # the interrupted save never completed; nothing half-written counts


def _interrupted_ddp(rank: int, world: int, whole: list[str], part: list[str]) -> dict[str, Any]:
    Trainer(load_config(None, whole)).fit()
    mp = pytest.MonkeyPatch()
    _signal_during(mp, 3, signal.SIGTERM, rank=1)  # only rank 1 is told
    t = Trainer(load_config(None, part))
    stopped: BaseException | None = None
    try:
        t.fit()
    except KeyboardInterrupt as e:
        stopped = e
    finally:
        mp.undo()
    at = t.step
    del t
    resumed = Trainer(load_config(None, [*part, "resume=auto"]))
    start = resumed.step
    resumed.fit()
    state = {k: v.detach().clone() for k, v in resumed.model.state_dict().items()}
    return {"stopped": stopped is not None, "at": at, "start": start, "state": state}


@pytest.mark.multiprocess
def test_ddp_ranks_agree_on_the_stop(toy_data: Path, tmp_path: Path):
    """Rank 1 alone gets SIGTERM during step 3: both ranks stop after the same step (the request travels with
    the next step's all-reduce, so no step waits on an extra host-device synchronisation), write one complete
    checkpoint, and the resumed run ends with the uninterrupted run's losses and weights."""
    extra = ["total_steps=8", "save_every=0", "eval_every=0", "log.progress=off"]
    whole, part = tiny_run_args(toy_data, tmp_path / "whole", *extra), tiny_run_args(toy_data, tmp_path / "p", *extra)
    r0, r1 = spawn(_interrupted_ddp, 2, whole, part, tmp=tmp_path)
    assert r0["stopped"] and r1["stopped"]
    assert r0["at"] == r1["at"] == r0["start"] == r1["start"]
    assert r0["at"] in (3, 4)  # the step under way, or one more while the request reaches every rank
    assert _losses(tmp_path / "p") == _losses(tmp_path / "whole")
    for k, v in r0["state"].items():
        torch.testing.assert_close(r1["state"][k], v, rtol=0, atol=0, msg=k)
