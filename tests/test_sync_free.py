"""Training steps that read nothing back from the device (:mod:`timmface.sync_free`), checked on the CPU.

On CUDA every host read of a device value waits for the device; the trainer's step makes none
(``Trainer.sync_free``, on by default there). Here the same path runs on the CPU (``SYNC_FREE = True``) under a
dispatch mode that records every operation that would be such a read on a GPU -- ``.item()``/``bool()``/
``float()`` (``aten._local_scalar_dense``), ``nonzero``, ``unique``, boolean indexing, ``.tolist()``,
``.numpy()``, ``.cpu()`` -- on any tensor that is not host data (the loader's batch and what is computed from
it alone). And it must give the per-step check's results exactly: losses, logs, weights, skipped steps and
the stop messages. ``tests/test_gpu.py`` checks the same steps with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.conftest import tiny_run_args, write_toy_dataset
from tests.test_faults import _poison
from timmface.config import load_config
from timmface.distill import DistillTrainer
from timmface.errors import TimmfaceError
from timmface.model import partial_fc_sample
from timmface.sync_free import StepMeter
from timmface.trainer import Trainer

# ops whose result the host must wait for on a GPU: a value, or an output size that depends on values
SYNCING = {"_local_scalar_dense", "nonzero", "argwhere", "_unique", "_unique2", "unique_dim", "unique_consecutive",
           "masked_select", "bincount", "repeat_interleave", "equal", "is_nonzero"}  # fmt: skip
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}  # with a boolean index: a nonzero inside


def _caller() -> str:
    """The innermost frame in timmface's or the teachers' code: where a read happened."""
    import traceback

    for frame in reversed(traceback.extract_stack()):
        if "/timmface/" in frame.filename or "/teachers/" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.line}"
    return "?"


class HostReads(TorchDispatchMode):
    """Records the operations that would make the host wait for a GPU (see the module docstring).

    A tensor is *host data* when it was handed over by the loader (:meth:`host`) or computed from host data
    only; reads of those are free on a GPU too. Reads inside :meth:`allowed` (log, checkpoint, evaluation)
    are expected and not recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.hosted: dict[int, weakref.ref[Tensor]] = {}  # by id: tensors compare elementwise, not by identity
        self.reads: list[str] = []
        self.depth = 0

    def host(self, *tensors: Tensor) -> None:
        for t in tensors:
            if isinstance(t, Tensor):
                self.hosted[id(t)] = weakref.ref(t)

    def device(self, *tensors: Tensor) -> None:
        for t in tensors:
            self.hosted.pop(id(t), None)

    def is_host(self, t: Tensor) -> bool:
        ref = self.hosted.get(id(t))
        return ref is not None and ref() is t

    @contextmanager
    def allowed(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def record(self, what: str, tensors: list[Tensor]) -> None:
        if self.depth == 0 and not all(self.is_host(t) for t in tensors):
            self.reads.append(f"{what} at {_caller()}")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        name = func.overloadpacket.__name__
        if name in SYNCING or (name in INDEXING and any(t.dtype == torch.bool for t in tensors[1:2] + tensors[2:])):
            self.record(name, tensors)
        out = func(*args, **kwargs)
        if tensors and all(self.is_host(t) for t in tensors):
            self.host(*[t for t in tree_flatten(out)[0] if isinstance(t, Tensor)])
        return out


@contextmanager
def watch_host_reads(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostReads]:
    """Run ``trainer.fit`` under :class:`HostReads` from its first step on, with the batch tagged as host data,
    a real copy standing in for the CPU's no-op ``.to(device)``, and the boundary work allowed."""
    mode = HostReads()
    loader = trainer.loader

    class Tagged:
        def __next__(self) -> Any:
            with mode.allowed():  # the CPU loader's own work (e.g. its workers' base seed, drawn on the host)
                batch = next(loader)
            mode.host(batch.images, batch.labels, batch.indices, batch.flips)
            return batch

        def __getattr__(self, name: str) -> Any:
            return getattr(loader, name)

    trainer.loader = Tagged()  # type: ignore[assignment]
    normalizer = trainer.to_device

    def to_device(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        moved = tuple(t.clone() for t in (batch.images, batch.flips, batch.labels))  # "copied to the device"
        mode.device(*moved)
        return moved  # type: ignore[return-value]

    monkeypatch.setattr(normalizer, "_to_device", to_device)
    boundary = [(Trainer, "_catch_up"), (Trainer, "save"), (Trainer, "evaluate"), (Trainer, "_finish"),
                (StepMeter, "read")]  # fmt: skip
    if type(trainer).evaluate is not Trainer.evaluate:  # a subclass's evaluation (the teacher's accuracy too)
        boundary.append((type(trainer), "evaluate"))
    for cls, name in boundary:
        real = getattr(cls, name)

        def wrapped(*a: Any, _real: Any = real, **k: Any) -> Any:
            with mode.allowed():
                return _real(*a, **k)

        monkeypatch.setattr(cls, name, wrapped)
    for name in ("tolist", "numpy", "cpu", "__array__"):
        real = getattr(Tensor, name)

        def reader(t: Tensor, *a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            mode.record(_name, [t])
            return _real(t, *a, **k)

        monkeypatch.setattr(Tensor, name, reader)
    real_step = trainer.train_step
    entered = []

    def first_step_enters() -> Any:
        if not entered:
            mode.__enter__()
            entered.append(True)
        return real_step()

    trainer.train_step = first_step_enters  # type: ignore[method-assign]
    try:
        yield mode
    finally:
        if entered:
            mode.__exit__(None, None, None)


class SyncFree(Trainer):
    SYNC_FREE = True
    FUSED_OPTIMIZER = True


class PerStep(Trainer):
    SYNC_FREE = False
    FUSED_OPTIMIZER = True


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 classes x 2 images: Partial FC with 12 of 24 centres samples for real."""
    return write_toy_dataset(tmp_path_factory.mktemp("syncfree") / "toy24", num_classes=24, per_class=2)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_run_args(
        data, out, "eval_every=0", "save_every=0", "data.num_workers=1", "head.partial_fc=12",
        "optim.clip_grad_norm=1.0", "ema.warmup_steps=2", "ema.every=1", *extra,
    )  # fmt: skip


def _records(run: Path) -> dict[int, dict[str, Any]]:
    """Training records by step (timings left out; NaN written as a string read back as a float)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    num = lambda v: float(v) if isinstance(v, str) and v in ("nan", "inf", "-inf") else v  # noqa: E731
    keep = lambda k: k not in ("elapsed_s", "img_per_s")  # noqa: E731
    return {m["step"]: {k: num(v) for k, v in m.items() if keep(k)} for m in lines if "loss" in m}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


class SyncFreeDistill(DistillTrainer):
    SYNC_FREE = True
    FUSED_OPTIMIZER = True


@pytest.mark.parametrize("loss", ["cosface", "adaface", "online teacher"])
def test_sync_free_steps_read_nothing_back(
    many_classes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loss: str
) -> None:
    """Between log steps (log.every=4 over 9 steps) nothing reads a device value: margin loss (AdaFace's
    statistics included), Partial FC sampling, clipping, the fused AdamW step, EMA, the logged sums; an online
    teacher (iResNet-18) with the recipe's terms (frozen teacher centres, feature KD)."""
    cls: type[Trainer] = SyncFree
    extra = ["log.every=4", "total_steps=9"]
    if loss == "online teacher":
        from tests.test_teachers import IRESNET, iresnet_shapes, random_weights

        torch.save(random_weights(iresnet_shapes(IRESNET["iresnet18"]), seed=0), tmp_path / "backbone.pth")
        teacher = f"distill.teacher={tmp_path / 'backbone.pth'}"
        # the shipped method (configs/demo_distill.yaml): frozen teacher centres + feature KD. (AdaDistill and the
        # teacher memory do read back: the rows they touch depend on the labels' values.)
        extra += [teacher, "model.embed_dim=512", "distill.teacher_dtype=float32", "distill.centres=frozen"]
        extra.append("distill.feature_weight=10")
        cls = SyncFreeDistill
    else:
        extra.append(f"loss.name={loss}")
    t = cls(load_config(None, _args(many_classes, tmp_path / "r", *extra)))
    assert t.sync_free and t.optimizer.defaults.get("fused")
    with watch_host_reads(t, monkeypatch) as mode:
        t.fit()
    assert mode.reads == [], mode.reads
    losses = [r["loss"] for r in _records(tmp_path / "r").values()]
    assert t.step == 9 and len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_the_detector_sees_the_per_step_check(many_classes: Path, tmp_path: Path, monkeypatch) -> None:
    """The same run with the per-step check: the detector records its reads (one ``item`` per step, at least),
    so an empty record above means something."""
    t = PerStep(load_config(None, _args(many_classes, tmp_path / "r", "log.every=4", "total_steps=4")))
    assert not t.sync_free
    with watch_host_reads(t, monkeypatch) as mode:
        t.fit()
    assert sum(r.startswith("_local_scalar_dense at trainer.py") for r in mode.reads) >= 3, mode.reads


@pytest.mark.parametrize("log_every", [1, 3])
def test_sync_free_steps_give_the_per_step_results(
    many_classes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, log_every: int
) -> None:
    """Skipped steps 3 and 5 (NaN loss) with AdaFace: the same logged records (NaN loss and ``skipped`` in the
    window of a bad step), the same weights, optimiser state, AdaFace statistics and counters, the same
    warnings -- whether the flags are read at once or at the end of a 3-step window."""
    _poison(monkeypatch, {3, 5})
    runs = {}
    for cls in (PerStep, SyncFree):
        out = tmp_path / cls.__name__
        t = cls(load_config(None, _args(many_classes, out, "loss.name=adaface", f"log.every={log_every}",
                                        "total_steps=8", "deterministic=true")))  # fmt: skip
        t.fit()
        runs[cls] = (t, _records(out), capsys.readouterr().out)
    (a, rec_a, out_a), (b, rec_b, out_b) = runs[PerStep], runs[SyncFree]
    assert rec_a.keys() == rec_b.keys()
    for step in rec_a:
        assert rec_a[step].keys() == rec_b[step].keys(), step
        assert all(_same(rec_a[step][k], rec_b[step][k]) for k in rec_a[step]), (step, rec_a[step], rec_b[step])
    assert any(math.isnan(r["loss"]) and r["skipped"] > 0 for r in rec_b.values())
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a.optimizer.state.values(), b.optimizer.state.values(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a.counters["nonfinite"] == b.counters["nonfinite"] == 2
    warnings = [line for line in out_b.splitlines() if line.startswith("warning: non-finite")]
    assert warnings == [line for line in out_a.splitlines() if line.startswith("warning: non-finite")]
    assert warnings == [f"warning: non-finite loss at step {s}: step skipped" for s in (3, 5)]


def test_a_stop_names_the_bad_step_and_a_checkpoint_from_before_it(
    many_classes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nonfinite=stop, step 5 bad, checkpoints every 2 steps, flags read only every 4 steps: the run stops
    before writing the step-6 checkpoint, naming step 5 and the step-4 checkpoint -- as the per-step check does."""
    from timmface.checkpoint import checkpoint_path, list_checkpoints

    _poison(monkeypatch, {5})
    messages = {}
    for cls in (PerStep, SyncFree):
        out = tmp_path / cls.__name__
        t = cls(load_config(None, _args(many_classes, out, "log.every=4", "save_every=2", "total_steps=8",
                                        "nonfinite=stop")))  # fmt: skip
        with pytest.raises(TimmfaceError) as e:
            t.fit()
        messages[cls] = str(e.value).replace(str(out), "RUN")
        assert [s for s, _ in list_checkpoints(out)] == [2, 4]
        assert str(e.value).endswith(f"last good checkpoint: {checkpoint_path(out, 4)}")
    assert messages[PerStep] == messages[SyncFree]
    assert "non-finite loss at step 5 (1 so far; nonfinite=stop" in messages[SyncFree]


def test_partial_fc_sample_without_unique_matches_the_reference() -> None:
    """When every positive fits (k >= N), scoring the labels directly gives the indices (and consumes the
    random numbers) of the reference algorithm: unique positives scored 2, the rest uniform, top k."""

    def reference(labels: Tensor, num_classes: int, k: int, generator: torch.Generator) -> Tensor:
        positives = torch.unique(labels)
        score = torch.rand(num_classes, generator=generator)
        score[positives] = 2.0
        return torch.topk(score, k, sorted=False).indices.sort().values

    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 50, (16,), generator=g)  # repeats
        for k in (16, 20, 49):
            got = partial_fc_sample(labels, 50, k, generator=torch.Generator().manual_seed(seed + 100))
            ref = reference(labels, 50, k, torch.Generator().manual_seed(seed + 100))
            assert torch.equal(got, ref) and set(labels.tolist()) <= set(got.tolist())


def test_step_meter_sums_like_host_floats() -> None:
    """Device sums in float64 equal a host sum of float(value) per step; images are summed, not averaged;
    ``skipped`` only appears for a window with a skipped step."""
    meter = StepMeter()
    values = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 0.2, 1e-8, 3.3)]
    for v in values:
        meter.add({"loss": v, "lr": 0.5, "images": torch.tensor(8.0), "skipped": torch.tensor(0.0)})
    means, images = meter.read()
    host = 0.0
    for v in values:
        host += float(v)
    assert means == {"loss": host / 4, "lr": 0.5} and images == 32.0
    meter.add({"loss": torch.tensor(float("nan")), "skipped": torch.tensor(1.0)})
    means, _ = meter.read()
    assert math.isnan(means["loss"]) and means["skipped"] == 1.0
