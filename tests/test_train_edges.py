"""Sharp edges of training (issue 13): each test failed before its fix.

Partial FC's ``1.0``, AdaFace's running statistics and non-finite norms, the evaluation dtype, an
``output_dir`` that is a file, ``timmface train`` with a teacher, the ETA with evaluation in it, a resumed
run with another ``total_steps``, and ``amp: auto``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_run_args
from timmface.cli import main
from timmface.config import load_config
from timmface.errors import ConfigError
from timmface.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def _error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _records(run: Path) -> dict[int, dict[str, Any]]:
    """Training records of ``metrics.jsonl`` by step (NaN, written as a string, read back as a float)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = {k: float(v) if v in ("nan", "inf") else v for k, v in m.items()}
    return out


# --------------------------------------------------------------------------------------------------
# head.partial_fc: 1.0 is not "all classes"
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "1.0"])
def test_partial_fc_of_one_is_refused_naming_both_readings(value: str):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"head.partial_fc={value}"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("head.partial_fc=1")
    assert "count" in msg and "one class" in msg  # how timmface reads it
    assert "sample_rate=1.0" in msg and "head.partial_fc=0" in msg  # what an arcface_torch user meant


def test_partial_fc_count_must_be_whole_and_cover_the_batch(toy_data: Path, tmp_path: Path, capsys):
    with pytest.raises(ConfigError, match=r"head.partial_fc=2.5: a count of class centres must be a whole number"):
        load_config(None, ["head.partial_fc=2.5"])
    # batch 8 on one rank: 4 sampled centres cannot hold the (up to) 8 classes of a batch
    assert main(["train", *tiny_run_args(toy_data, tmp_path / "a", "head.partial_fc=4")]) == 2
    line = _error_line(capsys)
    assert "head.partial_fc=4" in line and "8" in line and "batch" in line
    # a count that covers the batch, a rate, and a count past the number of classes (= all) are fine
    for value, sampled in (("8", 8), ("0.5", 4), ("100", 8)):
        t = Trainer(load_config(None, tiny_run_args(toy_data, tmp_path / f"ok{value}", f"head.partial_fc={value}")))
        assert t.model.head.num_sampled == sampled


# --------------------------------------------------------------------------------------------------
# AdaFace: N x 1 norms, non-finite norms, skipped steps
# --------------------------------------------------------------------------------------------------


def _adaface_case(n: int = 6, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cosine = torch.rand(n, c, generator=g) * 2 - 1
    norms = torch.rand(n, generator=g) * 30 + 5
    labels = torch.randint(0, c, (n,), generator=g)
    return cosine, norms, labels


def test_adaface_accepts_the_references_n_by_1_norms():
    from timmface.losses import AdaFace

    cosine, norms, labels = _adaface_case()
    flat, column = AdaFace(), AdaFace()
    want = flat(cosine, norms, labels)
    got = column(cosine, norms[:, None], labels)  # mk-minchul/AdaFace head.py: norms = torch.norm(x, 2, 1, True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(column.batch_mean, flat.batch_mean, rtol=0, atol=0)
    torch.testing.assert_close(column.batch_std, flat.batch_std, rtol=0, atol=0)


def test_adaface_rejects_a_wrong_norms_shape_before_touching_its_statistics():
    from timmface.losses import AdaFace

    cosine, norms, labels = _adaface_case()
    loss = AdaFace()
    for bad in (norms[:-1], norms[:, None].expand(-1, 2), norms[None]):
        with pytest.raises(ValueError, match="norms"):
            loss(cosine, bad, labels)
        assert float(loss.batch_mean) == 20.0 and float(loss.batch_std) == 100.0


def test_adaface_statistics_come_from_the_finite_norms_only():
    """A NaN or infinite norm (an overflowed embedding) is left out of the running mean/std; the finite
    rows' loss is unchanged; all non-finite: the statistics do not move."""
    from timmface.losses import AdaFace

    cosine, norms, labels = _adaface_case(n=8)
    bad = norms.clone()
    bad[2], bad[5] = float("nan"), float("inf")
    loss = AdaFace(t_alpha=0.25)
    loss.margin_logits(cosine, bad, labels)
    finite = norms[[0, 1, 3, 4, 6, 7]].double().clamp(0.001, 100)
    mean = 0.25 * finite.mean() + 0.75 * 20.0
    std = 0.25 * finite.std() + 0.75 * 100.0  # unbiased, as the reference
    assert float(loss.batch_mean) == pytest.approx(float(mean), rel=1e-6)
    assert float(loss.batch_std) == pytest.approx(float(std), rel=1e-6)
    assert torch.isfinite(loss.batch_mean) and torch.isfinite(loss.batch_std)

    # the same statistics as a batch of only the finite rows, so their margin logits are the same too
    ref = AdaFace(t_alpha=0.25)
    keep = [0, 1, 3, 4, 6, 7]
    again = AdaFace(t_alpha=0.25)
    want = ref.margin_logits(cosine[keep], norms[keep], labels[keep])
    got = again.margin_logits(cosine, bad, labels)[keep]
    torch.testing.assert_close(got, want)

    before = (loss.batch_mean.clone(), loss.batch_std.clone())
    loss.margin_logits(cosine, torch.full_like(norms, float("nan")), labels)
    assert torch.equal(loss.batch_mean, before[0]) and torch.equal(loss.batch_std, before[1])


def _poison_images(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The images of these optimiser steps (1-based) become NaN: NaN embeddings, NaN norms."""
    real = Trainer._micro_step

    def micro_step(self: Trainer, batch: Any, sync: bool, scale: float) -> Any:
        if self.step + 1 in steps:
            to_device = self.to_device

            def poisoned(b: Any) -> Any:
                x, labels, flips = to_device(b)
                return x * float("nan"), labels, flips

            self.to_device = poisoned
            try:
                return real(self, batch, sync, scale)
            finally:
                self.to_device = to_device
        return real(self, batch, sync, scale)

    monkeypatch.setattr(Trainer, "_micro_step", micro_step)


def _adaface_stats(t: Trainer) -> tuple[float, float]:
    loss = t.model.head.loss
    return float(loss.batch_mean), float(loss.batch_std)


@pytest.mark.parametrize("poison", ["images", "loss"])
def test_one_nonfinite_step_does_not_poison_adaface(toy_data: Path, tmp_path: Path, monkeypatch, poison: str):
    """A skipped step leaves AdaFace's statistics as they were (NaN norms, or finite norms with a NaN loss),
    and the run goes on with finite losses."""
    if poison == "images":
        _poison_images(monkeypatch, {3})
    else:
        real = Trainer._forward

        def forward(self: Trainer, x: Any, labels: Any, targets: Any) -> dict[str, Any]:
            out = real(self, x, labels, targets)
            if self.step + 1 == 3:
                out["loss"] = out["loss"] * float("nan")
            return out

        monkeypatch.setattr(Trainer, "_forward", forward)
    run = tmp_path / "r"
    t = Trainer(load_config(None, tiny_run_args(toy_data, run, "loss.name=adaface", "eval_every=0", "max_nonfinite=2")))
    t.fit(until=2)
    before = _adaface_stats(t)
    t.fit(until=3)
    assert _adaface_stats(t) == before
    t.fit()
    m = _records(run)
    assert math.isnan(m[3]["loss"]) and m[6]["nonfinite_skipped"] == 1
    assert all(math.isfinite(m[s]["loss"]) for s in (1, 2, 4, 5, 6))
    assert all(math.isfinite(v) for v in _adaface_stats(t)) and _adaface_stats(t) != before


# --------------------------------------------------------------------------------------------------
# In-training evaluation dtype
# --------------------------------------------------------------------------------------------------


def test_in_training_evaluation_is_fp32_unless_eval_amp_says_otherwise(toy_data: Path, tmp_path: Path, monkeypatch):
    """``eval_amp`` (default ``none``, as ``timmface eval``) decides the evaluation's autocast on every device;
    the training ``amp`` does not leak into it (it did on CUDA)."""
    import timmface.trainer as trainer_module

    seen: list[Any] = []
    real = trainer_module.embed_uint8

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(kwargs.get("amp_dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "embed_uint8", spy)
    t = Trainer(load_config(None, tiny_run_args(toy_data, tmp_path / "a", "amp=bfloat16", "total_steps=1")))
    assert t.cfg.eval_amp == "none"
    t.evaluate()
    assert seen and set(seen) == {None}
    seen.clear()
    t = Trainer(load_config(None, tiny_run_args(toy_data, tmp_path / "b", "eval_amp=bfloat16", "total_steps=1")))
    t.evaluate()
    assert seen and set(seen) == {torch.bfloat16}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_evaluation_equals_fp32_eval_of_the_checkpoint(toy_data: Path, tmp_path: Path):
    from tests.test_eval_cli import hard_bin
    from timmface.checkpoint import checkpoint_path
    from timmface.data.bin import read_bin
    from timmface.evaluation.verification import embed_pairs, evaluate_bin
    from timmface.export import load_run_model

    run, val = tmp_path / "r", hard_bin(tmp_path / "hard.bin")
    args = tiny_run_args(toy_data, run, "amp=bfloat16", "device=cuda", "eval_every=0", f"data.val_sets=[{val}]")
    t = Trainer(load_config(None, args))
    captured: list[torch.Tensor] = []
    embed = t.embed_images
    t.embed_images = lambda backbone, images: captured.append(embed(backbone, images)) or captured[-1]
    got = t.fit()
    model = load_run_model(str(checkpoint_path(run, 6))).backbone.cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False  # as in `timmface eval` (PyTorch's default; training turns it on)
    # bf16 embeddings differ from fp32 ones by ~1e-2 relative: far outside this tolerance
    torch.testing.assert_close(captured[-1], embed_pairs(model, read_bin(val)[0], image_size=32), rtol=1e-4, atol=1e-4)
    want = evaluate_bin(model, val, image_size=32)
    assert got["acc/hard"] == want.accuracy and got["threshold/hard"] == want.threshold


# --------------------------------------------------------------------------------------------------
# Bad settings: one line, exit 2
# --------------------------------------------------------------------------------------------------


def test_output_dir_that_is_a_file_is_one_line(toy_data: Path, tmp_path: Path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    for out in (target, target / "run"):
        assert main(["train", *tiny_run_args(toy_data, out)]) == 2
        line = _error_line(capsys)
        assert f"output_dir={out}" in line and "is a file" in line and str(target) in line
    assert target.read_text() == "keep me\n"


@pytest.mark.parametrize("setting", ["distill.teacher=/teachers/r100.pth", "distill.cache=r100.tfemb"])
def test_train_with_a_teacher_points_to_distill(toy_data: Path, tmp_path: Path, capsys, setting: str):
    run = tmp_path / "r"
    assert main(["train", *tiny_run_args(toy_data, run), setting]) == 2
    line = _error_line(capsys)
    assert setting.split("=")[0] in line and "timmface distill" in line
    assert not (run / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# The ETA counts evaluation
# --------------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eta_counts_the_evaluations_still_to_come():
    """20 steps of 1 s, an evaluation every 5 steps (and at the end): before the first one the ETA uses the
    estimate it was given, after it the measured duration."""
    from timmface.metrics import Progress

    clock = _Clock()
    p = Progress(20, 0, mode="off", eval_every=5, clock=clock)
    p.set_eval_estimate(8.0)
    for step in range(1, 5):
        clock.now += 1.0
        p.update(step, {}, emit=False)
    assert p.eta(4) == pytest.approx(16 * 1.0 + 4 * 8.0)  # evaluations at 5, 10, 15, 20 still to come
    clock.now += 1.0
    p.update(5, {}, emit=False)
    assert p.eta(5) == pytest.approx(15 * 1.0 + 4 * 8.0)  # step 5's evaluation has not run yet
    clock.now += 20.0
    p.eval_done(5, 20.0)
    for step in range(6, 11):
        clock.now += 1.0
        p.update(step, {}, emit=False)
    # training time per step excludes the 20 s evaluation; 3 evaluations of 20 s still to come (10, 15, 20)
    assert p.eta(10) == pytest.approx(10 * 1.0 + 3 * 20.0)
    # resumed at step 12 of a run whose last evaluation was at 10: 15 and 20 remain
    q = Progress(20, 12, mode="off", eval_every=5, clock=clock)
    q.set_eval_estimate(3.0)
    clock.now += 2.0
    q.update(13, {}, emit=False)
    assert q.eta(13) == pytest.approx(7 * 2.0 + 2 * 3.0)
    # evaluation only at the end (eval_every=0), and no evaluation at all (no val sets)
    r = Progress(20, 0, mode="off", eval_every=0, clock=clock)
    r.set_eval_estimate(5.0)
    clock.now += 1.0
    r.update(1, {}, emit=False)
    assert r.eta(1) == pytest.approx(19 * 1.0 + 5.0)
    s = Progress(20, 0, mode="off", eval_every=None, clock=clock)
    clock.now += 1.0
    s.update(1, {}, emit=False)
    assert s.eta(1) == pytest.approx(19 * 1.0)


def test_trainer_feeds_the_eta_an_evaluation_estimate_and_each_evaluations_time(
    toy_data: Path, tmp_path: Path, monkeypatch
):
    import timmface.trainer as trainer_module
    from timmface.metrics import Progress

    calls: list[tuple[str, Any, Any]] = []

    class Recording(Progress):
        def set_eval_estimate(self, seconds: float) -> None:
            calls.append(("estimate", None, seconds))
            super().set_eval_estimate(seconds)

        def eval_done(self, step: int, seconds: float) -> None:
            calls.append(("eval", step, seconds))
            super().eval_done(step, seconds)

        def update(self, step: int, values: dict[str, Any], emit: bool) -> None:
            calls.append(("update", step, None))
            super().update(step, values, emit)

    monkeypatch.setattr(trainer_module, "Progress", Recording)
    Trainer(load_config(None, tiny_run_args(toy_data, tmp_path / "r"))).fit()
    kinds = [c[0] for c in calls]
    assert kinds.index("estimate") < kinds.index("update")  # the first ETA already counts evaluation
    assert calls[kinds.index("estimate")][2] > 0
    assert [(c[1], c[2] > 0) for c in calls if c[0] == "eval"] == [(3, True), (6, True)]


# --------------------------------------------------------------------------------------------------
# Resuming with another total_steps
# --------------------------------------------------------------------------------------------------


def _cosine(step: float, total: float, base: float = 1e-3, final_mult: float = 0.01) -> float:
    """The schedule of tiny_run_args with optim.warmup=0, written out again in float64."""
    final = base * final_mult
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(step, total) / total))


def test_longer_total_steps_continues_the_schedule_without_a_jump(toy_data: Path, tmp_path: Path, capsys):
    """Stopped at step 3 of 6, resumed with total_steps=12: the rest of the schedule (steps 3..6) is stretched
    over steps 3..12, so the learning rate goes on falling from where it was; the message says what happens
    and names the other choice."""

    def make(out: Path, *extra: str) -> Trainer:
        args = tiny_run_args(toy_data, out, "eval_every=0", "save_every=3", "optim.warmup=0", *extra)
        return Trainer(load_config(None, args))

    run = tmp_path / "r"
    make(run).fit(until=3)
    capsys.readouterr()
    t = make(run, "resume=auto", "total_steps=12")
    out = capsys.readouterr().out
    assert "total_steps 6 -> 12" in out and "optim.resume_schedule=continue" in out and "recompute" in out
    t.fit()
    lr = {s: m["lr"] for s, m in _records(run).items()}
    # step s uses the rate of s - 1 completed steps; after step 3, position 3 + 3 * (s - 1 - 3) / 9 of the old run
    for s in range(4, 13):
        assert lr[s] == pytest.approx(_cosine(3 + 3 * (s - 1 - 3) / 9, 6), rel=1e-9), s
    assert all(lr[s + 1] < lr[s] for s in range(1, 12))  # never back up
    # a second resume of the extended run keeps its schedule exactly
    part = tmp_path / "p"
    make(part).fit(until=3)
    make(part, "resume=auto", "total_steps=12").fit(until=6)
    make(part, "resume=auto", "total_steps=12").fit()
    same = ("loss", "lr", "grad_norm")
    assert {s: [m[k] for k in same] for s, m in _records(part).items()} == {
        s: [m[k] for k in same] for s, m in _records(run).items()
    }


def test_recompute_follows_the_longer_schedule(toy_data: Path, tmp_path: Path):
    run = tmp_path / "r"
    args = tiny_run_args(toy_data, run, "eval_every=0", "save_every=3", "optim.warmup=0")
    Trainer(load_config(None, args)).fit(until=3)
    Trainer(load_config(None, [*args, "resume=auto", "total_steps=12", "optim.resume_schedule=recompute"])).fit()
    lr = {s: m["lr"] for s, m in _records(run).items()}
    for s in range(4, 13):
        assert lr[s] == pytest.approx(_cosine(s - 1, 12), rel=1e-9), s
    assert lr[4] > lr[3]  # the jump this choice implies


# --------------------------------------------------------------------------------------------------
# amp: auto
# --------------------------------------------------------------------------------------------------

SAPPHIRE_RAPIDS = "flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8\n"
COOPER_LAKE = "flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SKYLAKE = "flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_vnni\n"
ZEN3 = "flags\t\t: fpu sse sse2 avx avx2 fma\n"


def test_cpu_bf16_matrix_units_are_read_from_the_cpu_flags():
    from timmface.amp import cpu_bf16_units

    assert cpu_bf16_units(SAPPHIRE_RAPIDS) == "AMX-BF16"
    assert cpu_bf16_units(COOPER_LAKE) == "AVX512-BF16"
    assert cpu_bf16_units(SKYLAKE) is None  # AVX-512 without bf16 instructions: emulated, slower than fp32
    assert cpu_bf16_units(ZEN3) is None
    assert cpu_bf16_units("") is None


def test_amp_auto_resolves_per_device(monkeypatch):
    import timmface.amp as amp_module
    from timmface.amp import resolve_amp

    monkeypatch.setattr(amp_module, "cpu_bf16_units", lambda text=None: "AMX-BF16")
    assert resolve_amp("auto", torch.device("cpu")) == (torch.bfloat16, "auto: the CPU has AMX-BF16")
    monkeypatch.setattr(amp_module, "cpu_bf16_units", lambda text=None: None)
    dtype, why = resolve_amp("auto", torch.device("cpu"))
    assert dtype is None and "no bf16 matrix units" in why
    assert resolve_amp("auto", torch.device("cuda"))[0] in (torch.bfloat16, torch.float16)
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("none", None)):
        assert resolve_amp(name, torch.device("cpu"))[0] is dtype


def test_amp_auto_is_the_default_and_the_demos(toy_data: Path, tmp_path: Path):
    import yaml

    from timmface.amp import resolve_amp

    assert load_config(None, []).amp == "auto"
    assert yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["amp"] == "auto"
    t = Trainer(load_config(None, [a for a in tiny_run_args(toy_data, tmp_path / "r") if not a.startswith("amp=")]))
    assert t.amp_dtype is resolve_amp("auto", torch.device("cpu"))[0]
    assert "amp " in t.describe()


def test_train_step_benchmark_runs_any_backbone_without_kwargs():
    """``--backbone lcnet_050`` without ``--kwargs`` used to pass ConvNeXt's ``patch_size`` to it."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--backbone", "lcnet_050", "--batch", "2",
         "--classes", "16", "--steps", "1", "--images", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train step lcnet_050" in proc.stdout and "amp=auto" in proc.stdout
