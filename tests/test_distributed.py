"""World size as a test subject: DDP vs one process, sharded Partial FC, resume across world sizes,
gradient accumulation, evaluation sharding, SLURM environment, sharded checkpoint files.

Multi-process tests run 2 CPU processes with gloo (``torch.multiprocessing`` spawning processes that
build the real :class:`~timmface.trainer.Trainer`, or ``torchrun`` running the real CLI) on the tiny
``test_vit`` at 32x32. SGD is used where gradients are compared through weights: Adam's update hardly
depends on the gradient's scale, so it would hide a missing or doubled averaging.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import tiny_run_args, write_toy_dataset
from timmface.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_resume,
    prune_checkpoints,
    save_checkpoint,
    save_shard,
    shard_path,
)
from timmface.cli import main
from timmface.config import load_config
from timmface.distributed import _first_slurm_host, slurm_rendezvous_env, world_info_from_env
from timmface.errors import CheckpointError
from timmface.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------
# Harness: spawn W processes that join one gloo group and run a module-level function
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # the result is on disk: skip the interpreter's teardown, where gloo's C++ destructors occasionally abort
    # ("terminate called without an active exception") after a rank has raised and recovered, under load
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable, world: int, *args: Any, tmp: Path) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; returns each rank's result."""
    out = tmp / f"results_{fn.__name__}"
    out.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # children inherit it before they import torch
    try:
        mp.spawn(_entry, args=(world, _free_port(), fn, args, str(out)), nprocs=world, join=True)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_run_args(data, out, "eval_every=0", "log.progress='off'", *extra)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"backbone.{k}": v.detach().clone() for k, v in trainer.model.backbone.state_dict().items()}
    head = trainer.margin_head
    state["head.weight"] = head.full_weight() if trainer.sharded_head is not None else head.weight.detach().clone()
    return state


def _assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


SGD = ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.warmup=0", "optim.weight_decay=0"]

# --------------------------------------------------------------------------------------------------
# (a) DDP over 2 ranks == one process with the same global batch; evaluation sharding
# --------------------------------------------------------------------------------------------------


def _ddp_run(rank: int, world: int, args: list[str]) -> dict[str, Any]:
    trainer = Trainer(load_config(None, args))
    results = trainer.fit()
    images, _ = trainer._read_val(trainer.val_sets[0])
    backbone = trainer.eval_backbone().eval()
    return {
        "losses": _losses(trainer.output_dir) if rank == 0 else {},
        "state": _state(trainer),
        "acc": results["acc/toy_val"],
        "emb_all": trainer.embed_images(backbone, images),
        "emb_one": trainer.embed_images(backbone, images[:1]),  # rank 0's slice is empty
    }


@pytest.mark.multiprocess
def test_ddp_two_ranks_match_one_process(toy_data: Path, tmp_path: Path):
    extra = ["total_steps=5", "save_every=0", "loss.name=cosface", *SGD]
    r0, r1 = spawn(_ddp_run, 2, _args(toy_data, tmp_path / "ddp", *extra), tmp=tmp_path)
    single = Trainer(load_config(None, _args(toy_data, tmp_path / "one", *extra)))
    results = single.fit()

    want = _losses(tmp_path / "one")
    assert list(r0["losses"]) == [1, 2, 3, 4, 5]
    for step, loss in want.items():  # the logged loss is the global batch's, not rank 0's half
        assert r0["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert want[5] < want[1]
    _assert_states_close(r0["state"], _state(single), rtol=1e-4, atol=1e-5)
    _assert_states_close(r0["state"], r1["state"], rtol=0, atol=0)  # replicas stay identical

    # evaluation: images split across ranks (one rank empty when N < W) and gathered in order
    images, _ = single._read_val(single.val_sets[0])
    backbone = single.eval_backbone().eval()
    one = single.embed_images(backbone, images)
    assert r0["emb_all"].shape == one.shape == (40, 32)
    torch.testing.assert_close(r0["emb_all"], one, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(r1["emb_all"], r0["emb_all"], rtol=0, atol=0)
    torch.testing.assert_close(r0["emb_one"], one[:1], rtol=1e-3, atol=1e-4)
    assert r0["acc"] == r1["acc"] == pytest.approx(results["acc/toy_val"])


# --------------------------------------------------------------------------------------------------
# (b) sharded Partial FC == the unsharded full softmax (loss, gradients); sampling per shard
# --------------------------------------------------------------------------------------------------

C, D = 11, 8
LABELS = torch.tensor([0, 10, 3, 5, 6, 10, 2])  # classes on both shards (rank 0 holds 0-5, rank 1 6-10)
SPLIT = (4, 3)  # uneven local batches


def _global_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(LABELS), D, generator=g) * 5, torch.randn(C, D, generator=g)


def _sharded_pfc(rank: int, world: int) -> dict[str, Any]:
    from timmface.losses import build_loss
    from timmface.partial_fc import ShardedMarginHead

    emb, weight = _global_case()
    lo = sum(SPLIT[:rank])
    out: dict[str, Any] = {}
    for name in ("cosface", "arcface", "adaface"):
        head = ShardedMarginHead(C, D, build_loss(name))
        start, stop = head.local_range
        with torch.no_grad():
            head.weight.copy_(weight[start:stop])
        x = emb[lo : lo + SPLIT[rank]].clone().requires_grad_()
        loss = head(x, LABELS[lo : lo + SPLIT[rank]])["margin"]
        loss.backward()
        out[name] = {"loss": loss.detach(), "emb_grad": x.grad, "weight_grad": head.weight.grad, "range": [start, stop]}
        out[name]["buffers"] = {k: v.clone() for k, v in head.loss.state_dict().items()}

    # sampling: 20 classes, rate 0.5 -> 10 centres, 5 per shard; shard 1 has 6 positives (all kept)
    from timmface.losses import CosFace

    labels = torch.tensor([0, 1, 2, 12, 15, 16, 17, 18, 19, 2])
    g = torch.Generator().manual_seed(1)
    emb20, weight20 = torch.randn(len(labels), D, generator=g), torch.randn(20, D, generator=g)
    torch.manual_seed(100 + rank)
    head = ShardedMarginHead(20, D, CosFace(), partial_fc=0.5).train()
    start, stop = head.local_range
    with torch.no_grad():
        head.weight.copy_(weight20[start:stop])
    lo, n = (0, 5) if rank == 0 else (5, 5)
    x = emb20[lo : lo + n].clone().requires_grad_()
    loss = head(x, labels[lo : lo + n])["margin"]
    loss.backward()
    out["sampled"] = {
        "loss": loss.detach(), "emb_grad": x.grad, "index": head.last_index + start,
        "num_sampled_local": head.num_sampled_local, "weight_grad": head.weight.grad,
    }  # fmt: skip

    # rows by global class id (teacher centres): each rank sets / averages only the classes it holds
    head = ShardedMarginHead(C, D, CosFace())
    before = head.full_weight()
    n_loaded = head.load_rows(torch.tensor([1, 7, 10]), torch.ones(3, D) * torch.tensor([[1.0], [2.0], [3.0]]))
    loaded = head.full_weight()
    n_ema = head.ema_rows(torch.tensor([7, 7, 2]), torch.tensor([[4.0] * D, [8.0] * D, [10.0] * D]), momentum=0.5)
    out["rows"] = {"before": before, "loaded": loaded, "ema": head.full_weight(), "n": [n_loaded, n_ema]}
    return out


@pytest.mark.multiprocess
def test_sharded_partial_fc_equals_full_softmax(tmp_path: Path):
    import torch.nn.functional as F

    from timmface.losses import CosFace, build_loss
    from timmface.model import MarginHead

    results = spawn(_sharded_pfc, 2, tmp=tmp_path)
    emb, weight = _global_case()
    for name in ("cosface", "arcface", "adaface"):
        ref = MarginHead(C, D, build_loss(name))
        with torch.no_grad():
            ref.weight.copy_(weight)
        x = emb.clone().requires_grad_()
        loss = ref(x, LABELS)["margin"]
        loss.backward()
        got = [r[name] for r in results]
        assert [g["range"] for g in got] == [[0, 6], [6, 11]]  # C // W, +1 for the first C % W ranks
        for g in got:  # the same global loss on every rank
            torch.testing.assert_close(g["loss"], loss.detach(), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(torch.cat([g["emb_grad"] for g in got]), x.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.cat([g["weight_grad"] for g in got]), ref.weight.grad, rtol=1e-4, atol=1e-6)
        for g in got:  # AdaFace: every rank saw the global norms, so its running statistics match one process
            for k, v in ref.loss.state_dict().items():
                torch.testing.assert_close(g["buffers"][k], v)
        assert x.grad.abs().sum() > 0 and ref.weight.grad.abs().sum() > 0

    # sampling: per-shard counts, positives kept, and the loss is the full softmax over the sampled columns
    s0, s1 = (r["sampled"] for r in results)
    assert (s0["num_sampled_local"], s1["num_sampled_local"]) == (5, 5)
    assert s0["index"].numel() == 5 and {0, 1, 2} <= set(s0["index"].tolist())
    assert s1["index"].tolist() == [12, 15, 16, 17, 18, 19]  # 6 positives > 5: all of them, no negative
    labels = torch.tensor([0, 1, 2, 12, 15, 16, 17, 18, 19, 2])
    g = torch.Generator().manual_seed(1)
    emb20, weight20 = torch.randn(len(labels), D, generator=g), torch.randn(20, D, generator=g)
    cols = torch.cat([s0["index"], s1["index"]])
    x = emb20.clone().requires_grad_()
    cos = F.normalize(x, dim=1) @ F.normalize(weight20[cols], dim=1).T
    remapped = torch.tensor([cols.tolist().index(int(y)) for y in labels])
    ref_loss = CosFace()(cos, x.norm(dim=1), remapped)
    ref_loss.backward()
    torch.testing.assert_close(s0["loss"], ref_loss.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(s1["loss"], ref_loss.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(torch.cat([s0["emb_grad"], s1["emb_grad"]]), x.grad, rtol=1e-4, atol=1e-6)
    # centres that were not sampled get no gradient
    grads = torch.cat([s0["weight_grad"], s1["weight_grad"]])
    unsampled = sorted(set(range(20)) - set(cols.tolist()))
    assert grads[unsampled].abs().sum() == 0 and grads[cols].abs().sum(1).gt(0).all()

    # load_rows / ema_rows address global class ids on whichever rank holds them
    r0, r1 = (r["rows"] for r in results)
    assert r0["n"] == [1, 1] and r1["n"] == [2, 1]  # rank 0 holds 0-5, rank 1 holds 6-10
    torch.testing.assert_close(r0["ema"], r1["ema"])
    expected = r0["before"].clone()
    expected[1], expected[7], expected[10] = 1.0, 2.0, 3.0
    torch.testing.assert_close(r0["loaded"], expected)
    expected[7] = 0.5 * 2.0 + 0.5 * 6.0  # the two rows of class 7 are averaged first
    expected[2] = 0.5 * r0["before"][2] + 0.5 * 10.0
    torch.testing.assert_close(r0["ema"], expected)


# --------------------------------------------------------------------------------------------------
# (c) kill and resume: on 2 ranks (exactly the uninterrupted run) and on 1 rank (re-sharded)
# --------------------------------------------------------------------------------------------------


def _resume_run(rank: int, world: int, full: list[str], part: list[str], adam: list[str]) -> dict[str, Any]:
    Trainer(load_config(None, adam)).fit()  # AdamW: its two moments per centre are re-sharded too
    whole = Trainer(load_config(None, full))
    whole.fit()
    first = Trainer(load_config(None, part))
    first.fit(until=3)  # a job that stops at step 3 (its checkpoint written), then exits
    del first
    second = Trainer(load_config(None, [*part, "resume=auto"]))
    step = second.step
    second.fit()
    return {
        "step": step,
        "whole": _losses(whole.output_dir) if rank == 0 else {},
        "resumed": _losses(second.output_dir) if rank == 0 else {},
        "state_whole": _state(whole),
        "state_resumed": _state(second),
    }


@pytest.mark.multiprocess
def test_sharded_resume_on_two_ranks_and_on_one(toy_data: Path, tmp_path: Path, capsys):
    extra = ["total_steps=6", "save_every=3", "head.sharded=true", *SGD, "optim.clip_grad_norm=2"]
    full, part = _args(toy_data, tmp_path / "whole", *extra), _args(toy_data, tmp_path / "b", *extra)
    adam = _args(toy_data, tmp_path / "adam", "total_steps=2", "head.sharded=true", "optim.warmup=0")
    r0, r1 = spawn(_resume_run, 2, full, part, adam, tmp=tmp_path)
    assert r0["step"] == r1["step"] == 3
    assert r0["resumed"] == r0["whole"]  # 2 ranks -> 2 ranks: bit for bit
    _assert_states_close(r0["state_resumed"], r0["state_whole"], rtol=0, atol=0)
    _assert_states_close(r0["state_whole"], r1["state_whole"], rtol=0, atol=0)

    # the step-3 checkpoint: a main file and one file per rank with its rows
    ckpt3 = checkpoint_path(tmp_path / "b", 3)
    shards = [shard_path(tmp_path / "b", 3, r, 2) for r in range(2)]
    assert all(p.is_file() for p in [ckpt3, *shards])
    rows = [load_checkpoint(p)["head_rows"] for p in shards]
    assert [(r["start"], r["count"]) for r in rows] == [(0, 4), (4, 4)]
    assert "weight" not in load_checkpoint(ckpt3)["head"]

    # timmface ckpt merge: one plain file, the full matrix, loadable with weights_only=True
    merged_path = tmp_path / "merged.pt"
    assert main(["ckpt", "merge", str(ckpt3), "--out", str(merged_path)]) == 0
    assert "8 x 32 class centres" in capsys.readouterr().out
    merged = torch.load(merged_path, weights_only=True)
    torch.testing.assert_close(merged["head"]["weight"], torch.cat([r["weight"] for r in rows]), rtol=0, atol=0)
    assert merged["sharding"] is None and merged["rank_files"] == 0

    # 1 rank from the 2-rank step-3 checkpoint: the centres and their optimiser state re-sharded
    one = Trainer(load_config(None, [*_args(toy_data, tmp_path / "one", *extra), f"resume={ckpt3}"]))
    assert one.step == 3
    torch.testing.assert_close(one.sharded_head.weight.detach(), merged["head"]["weight"], rtol=0, atol=0)
    index = one.head_optim_index
    momentum = torch.cat([r["optim"]["momentum_buffer"] for r in rows])
    torch.testing.assert_close(one.optimizer.state[one.sharded_head.weight]["momentum_buffer"], momentum)
    assert torch.equal(merged["optimizer"]["state"][index]["momentum_buffer"], momentum)
    one.fit()
    got = _losses(tmp_path / "one")
    assert sorted(got) == [4, 5, 6]
    # AdamW: exp_avg / exp_avg_sq rows follow the centres to their new rank; step stays as it was
    adam = Trainer(
        load_config(None, _args(toy_data, tmp_path / "adam1", "head.sharded=true", f"resume={tmp_path / 'adam'}"))
    )
    saved = [load_checkpoint(shard_path(tmp_path / "adam", 2, r, 2))["head_rows"]["optim"] for r in range(2)]
    state = adam.optimizer.state[adam.sharded_head.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].shape == (8, 32)
        torch.testing.assert_close(state[key], torch.cat([s[key] for s in saved]), rtol=0, atol=0)
    assert float(state["step"]) == 2.0
    for step in (4, 5, 6):  # the same computation at another world size: equal up to float rounding
        assert got[step] == pytest.approx(r0["whole"][step], rel=1e-4), step
    _assert_states_close(_state(one), r0["state_whole"], rtol=1e-3, atol=1e-4)


def test_checkpoints_convert_between_plain_and_sharded_heads(toy_data: Path, tmp_path: Path):
    """A plain run resumes sharded, and a merged sharded checkpoint resumes plain: same centres, same
    AdamW state, and the run continues with the plain run's losses (up to float rounding)."""
    extra = ["total_steps=6", "save_every=3", "optim.warmup=0"]
    plain = Trainer(load_config(None, _args(toy_data, tmp_path / "plain", *extra)))
    plain.fit()
    want = _losses(tmp_path / "plain")
    ckpt3 = load_checkpoint(checkpoint_path(tmp_path / "plain", 3))

    sharded = Trainer(load_config(None, [*_args(toy_data, tmp_path / "s", *extra, "head.sharded=true"),
                                         f"resume={checkpoint_path(tmp_path / 'plain', 3)}"]))  # fmt: skip
    torch.testing.assert_close(sharded.sharded_head.weight.detach(), ckpt3["head"]["weight"], rtol=0, atol=0)
    state = sharded.optimizer.state[sharded.sharded_head.weight]
    saved = ckpt3["optimizer"]["state"][sharded.head_optim_index]
    assert saved["exp_avg"].shape == (8, 32) and float(saved["step"]) == 3.0
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(state[key], saved[key], rtol=0, atol=0)
    sharded.fit()
    got = _losses(tmp_path / "s")
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([want[s] for s in (4, 5, 6)], rel=1e-4)

    merged = tmp_path / "merged.pt"
    assert main(["ckpt", "merge", str(tmp_path / "s"), "--out", str(merged)]) == 0
    back = Trainer(load_config(None, [*_args(toy_data, tmp_path / "p2", *extra), f"resume={merged}"]))
    assert back.step == 6 and back.model.head is not None
    torch.testing.assert_close(back.model.head.weight.detach(), sharded.sharded_head.weight.detach(), rtol=0, atol=0)
    state = back.optimizer.state[back.model.head.weight]
    for key, value in sharded.optimizer.state[sharded.sharded_head.weight].items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def _torchrun(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "timmface.cli", "train", *args]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (torchrun starts its workers in sessions of their own, so killing
    the launcher's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _sigkill_job(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker at once, as a scheduler ending a job would."""
    for pid in [launcher.pid, *_descendants(launcher.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.multiprocess
def test_torchrun_sigkill_then_resume(tmp_path: Path):
    """The real CLI under torchrun, killed with SIGKILL mid-run; drop path and Partial FC sampling make
    each rank's RNG matter, so an exact continuation needs every rank's own RNG state restored."""
    data = write_toy_dataset(tmp_path / "data40", num_classes=40, per_class=2)
    extra = ["total_steps=24", "save_every=4", "head.sharded=true", "head.partial_fc=0.5",
             "model.kwargs={img_size: 32, drop_path_rate: 0.2}", "loss.name=adaface"]  # fmt: skip
    whole = _torchrun(_args(data, tmp_path / "whole", *extra), tmp_path / "whole.log")
    killed = _torchrun(_args(data, tmp_path / "b", *extra), tmp_path / "b.log")
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        if any(step >= 8 for step, _ in list_checkpoints(tmp_path / "b")):
            _sigkill_job(killed)
            break
        time.sleep(0.02)
    assert killed.wait(60) == -signal.SIGKILL, (tmp_path / "b.log").read_text()[-2000:]
    assert whole.wait(120) == 0, (tmp_path / "whole.log").read_text()[-2000:]
    at_kill = list_checkpoints(tmp_path / "b")[-1][0]
    assert 8 <= at_kill < 24

    resumed = _torchrun([*_args(data, tmp_path / "b", *extra), "resume=auto"], tmp_path / "b2.log")
    assert resumed.wait(120) == 0, (tmp_path / "b2.log").read_text()[-2000:]
    assert f"resumed from {checkpoint_path(tmp_path / 'b', at_kill)}" in (tmp_path / "b2.log").read_text()
    assert _losses(tmp_path / "b") == _losses(tmp_path / "whole")  # every step, bit for bit

    # one process from the 2-rank checkpoint: same step, the centres are the saved shards, it trains on
    path, ckpt = load_resume(str(tmp_path / "b"), tmp_path / "b")
    # 32 more steps on the schedule of a 56-step run (the default, continue, would stay at the finished run's final lr)
    longer = [f"resume={path}", "total_steps=56", "optim.resume_schedule=recompute"]
    one = Trainer(load_config(None, [*_args(data, tmp_path / "one", *extra), *longer]))
    assert one.step == 24
    rows = [load_checkpoint(shard_path(tmp_path / "b", 24, r, 2))["head_rows"]["weight"] for r in range(2)]
    torch.testing.assert_close(one.sharded_head.weight.detach(), torch.cat(rows), rtol=0, atol=0)
    one.fit()
    got = _losses(tmp_path / "one")
    assert sorted(got) == list(range(25, 57))
    assert all(torch.isfinite(torch.tensor(v)) for v in got.values())
    mean = lambda steps: sum(got[s] if s > 24 else two[s] for s in steps) / len(steps)  # noqa: E731
    two = _losses(tmp_path / "whole")
    assert mean(range(25, 33)) < mean(range(1, 9)) - 5  # it starts where the 2-rank run was, not afresh
    assert mean(range(49, 57)) < mean(range(25, 33))  # and the loss keeps going down


# --------------------------------------------------------------------------------------------------
# (d) gradient accumulation == the large batch; no all-reduce before the last micro-step
# --------------------------------------------------------------------------------------------------


def test_grad_accum_equals_large_batch(toy_data: Path, tmp_path: Path):
    extra = ["total_steps=4", "loss.name=cosface", *SGD]
    states = []
    for accum in (1, 2, 4):
        t = Trainer(load_config(None, _args(toy_data, tmp_path / f"a{accum}", *extra, f"optim.grad_accum={accum}")))
        before = _state(t)
        values = [t.train_step() for _ in range(2)]
        states.append((_state(t), values))
    (s1, v1), (s2, v2), (s4, v4) = states
    assert any(not torch.equal(before[k], s1[k]) for k in s1)
    # float32 sums of 1, 2 or 4 micro-batches differ in their last bits (by ~1e-6 on AVX2 CPUs); a wrong
    # accumulation (a missing 1/accum, a dropped micro-batch) is off by a sizeable part of the update itself
    for s in (s2, s4):
        for k in s1:
            update = float((s1[k] - before[k]).abs().max())  # this tensor's own step size
            torch.testing.assert_close(
                s[k], s1[k], rtol=1e-4, atol=1e-6 + 1e-3 * update, msg=lambda m, k=k: f"{k}: {m}"
            )
    assert float(v2[0]["loss"]) == pytest.approx(float(v1[0]["loss"]), rel=1e-5)


def _step_counting_allreduces(trainer: Trainer) -> list[int]:
    """One optimiser step; how many DDP bucket all-reduces each micro-step launched (via a comm hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls: list[int] = []

    def hook(state, bucket):  # unannotated: DDP checks the annotations, which the future import makes strings
        calls.append(bucket.index())
        return allreduce_hook(None, bucket)

    trainer.ddp_model.register_comm_hook(None, hook)
    per_micro: list[int] = []
    original = trainer._micro_step

    def counted(batch: Any, sync: bool, scale: float) -> Any:
        before = len(calls)
        result = original(batch, sync, scale)
        per_micro.append(len(calls) - before)
        return result

    trainer._micro_step = counted  # type: ignore[method-assign]
    trainer.train_step()
    return per_micro


def _count_allreduce(rank: int, world: int, data: Path, out_dir: Path, extra: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for accum in (1, 2):
        t = Trainer(load_config(None, _args(data, out_dir / f"accum{accum}", *extra, f"optim.grad_accum={accum}")))
        out[accum] = {"micro_calls": _step_counting_allreduces(t), "state": _state(t)}
    return out


@pytest.mark.multiprocess
def test_ddp_grad_accum_uses_no_sync_until_the_last_micro_step(toy_data: Path, tmp_path: Path):
    extra = ["total_steps=4", "loss.name=cosface", *SGD]
    r0, _ = spawn(_count_allreduce, 2, toy_data, tmp_path / "ddp", extra, tmp=tmp_path)
    buckets = r0[1]["micro_calls"][0]
    assert buckets > 0
    assert r0[2]["micro_calls"] == [0, buckets]  # the first micro-step only accumulates locally
    single = Trainer(load_config(None, _args(toy_data, tmp_path / "one", *extra)))
    single.train_step()
    _assert_states_close(r0[2]["state"], _state(single), rtol=1e-4, atol=1e-6)
    _assert_states_close(r0[1]["state"], _state(single), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Launch environments and the sharded checkpoint layout (no processes)
# --------------------------------------------------------------------------------------------------


def test_slurm_environment():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "node[01-04]"}  # fmt: skip
    info = world_info_from_env(env)
    assert (info.rank, info.local_rank, info.world_size, info.source) == (5, 1, 8, "slurm")
    assert slurm_rendezvous_env(env) == {
        "MASTER_ADDR": "node01", "MASTER_PORT": str(29500 + 456), "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
    }  # fmt: skip
    # the step's node list wins over the job's (a step may run on a subset of the nodes)
    assert slurm_rendezvous_env({**env, "SLURM_STEP_NODELIST": "gpu-a[17,20-22]"})["MASTER_ADDR"] == "gpu-a17"
    assert _first_slurm_host("node07,node08") == "node07" and _first_slurm_host("login") == "login"
    # torchrun inside an allocation: its variables win; one SLURM task is a single process
    assert world_info_from_env({**env, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}).source == "torchrun"
    assert not world_info_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).distributed


def test_sharded_checkpoints_count_only_when_every_rank_file_exists(tmp_path: Path):
    run = tmp_path / "run"

    def save(step: int, world: int, ranks: range | None = None, main_file: bool = True) -> None:
        for r in ranks if ranks is not None else range(world):
            save_shard({"rng": None}, run, step, r, world)
        if main_file:
            save_checkpoint({"model": {}}, run, step, keep_last=2, rank_files=world)

    save(2, 2)
    save(4, 2)
    save(6, 2, ranks=range(1), main_file=False)  # killed while writing: one rank file, no main file
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    # a main file whose rank files are missing is not complete either
    shard_path(run, 4, 1, 2).unlink()
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert load_resume("auto", run)[0] == checkpoint_path(run, 2)
    with pytest.raises(CheckpointError, match="incomplete checkpoint: 1 of 2 rank files missing"):
        load_resume(str(checkpoint_path(run, 4)), run)
    # re-saving step 4 at another world size replaces its old rank files
    save(4, 3)
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    assert not shard_path(run, 4, 0, 2).exists()
    assert shard_path(run, 6, 0, 2).exists()  # newer than every complete step: it may still be being written
    # a newer complete step: prune to the newest 2, and drop the incomplete step 6 it left behind
    save(8, 1)
    assert [s for s, _ in list_checkpoints(run)] == [4, 8]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [
        "step_00000004.pt", "step_00000004.shard0of3.pt", "step_00000004.shard1of3.pt", "step_00000004.shard2of3.pt",
        "step_00000008.pt", "step_00000008.shard0of1.pt",
    ]  # fmt: skip
    prune_checkpoints(run, keep_last=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000008.pt", "step_00000008.shard0of1.pt"]


def _cli_rank(rank: int, world: int, port: int, args: list[str], out: str) -> None:
    """A rank as torchrun starts it: only the environment, no process group yet; the CLI starts and ends it."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    code = main(["train", *args])
    torch.save({"code": code, "initialized_after": dist.is_initialized()}, Path(out) / f"rank{rank}.pt")


@pytest.mark.multiprocess
def test_cli_ends_the_process_group_it_started(toy_data: Path, tmp_path: Path):
    """The CLI leaves no live process group behind (on success, and after a failure on gloo): every rank
    exits with its own status, not whatever the group's destructors do at interpreter exit."""
    for name, extra in (("ok", []), ("bad", ["resume=" + str(tmp_path / "missing.pt")])):
        out = tmp_path / name
        out.mkdir()
        mp.spawn(_cli_rank, args=(2, _free_port(), _args(toy_data, out / "run", *extra), str(out)), nprocs=2)
        results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
        assert [r["code"] for r in results] == ([0, 0] if name == "ok" else [2, 2])
        assert not any(r["initialized_after"] for r in results)
