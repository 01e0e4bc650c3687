"""Distillation terms against hand computations; the distillation trainer online and cached."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_same_weights, tiny_run_args, whole_and_resumed
from timmface.cli import main
from timmface.config import load_config
from timmface.distill import DistillTrainer, FeatureDistillation, RelationDistillation, compute_teacher_centres
from timmface.errors import ConfigError, DataError


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_feature_distillation_cosine_and_mse():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    term = FeatureDistillation(8, 8, "cosine", weight=2.0)
    assert term.proj is None
    value, weighted = term(s, torch.zeros(5), {"teacher": t})
    su, tu = _unit(s.numpy()), _unit(t.numpy())
    expected = np.mean(1 - (su * tu).sum(1))
    assert float(value) == pytest.approx(expected, rel=1e-6) and float(weighted) == pytest.approx(
        2 * expected, rel=1e-6
    )
    value, _ = FeatureDistillation(8, 8, "mse")(s, torch.zeros(5), {"teacher": t})
    assert float(value) == pytest.approx(np.mean((su - tu) ** 2), rel=1e-6)
    # different sizes: a bias-free projection, and the value uses it
    proj = FeatureDistillation(6, 8, "cosine")
    assert proj.proj is not None and proj.proj.weight.shape == (8, 6) and proj.proj.bias is None
    s6 = torch.randn(5, 6, dtype=torch.float64)
    value, _ = proj(s6, torch.zeros(5), {"teacher": t})
    p = _unit((s6.float() @ proj.proj.weight.T).detach().numpy())
    value = value.detach()
    assert float(value) == pytest.approx(np.mean(1 - (p * tu).sum(1)), rel=1e-5)


def test_relation_distillation_mse_and_kl():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    su, tu = _unit(s.double().numpy()), _unit(t.double().numpy())
    ss, st = su @ su.T, tu @ tu.T
    off = ~np.eye(6, dtype=bool)
    value, _ = RelationDistillation("mse")(s, torch.zeros(6), {"teacher": t})
    assert float(value) == pytest.approx(((ss - st) ** 2)[off].mean(), rel=1e-5)
    temp = 0.5
    value, _ = RelationDistillation("kl", temperature=temp)(s, torch.zeros(6), {"teacher": t})
    kl = []
    for i in range(6):
        a, b = ss[i][off[i]] / temp, st[i][off[i]] / temp
        ps, pt = np.exp(a) / np.exp(a).sum(), np.exp(b) / np.exp(b).sum()
        kl.append((pt * np.log(pt / ps)).sum())
    assert float(value) == pytest.approx(np.mean(kl) * temp**2, rel=1e-4)
    # identical embeddings: no relation loss
    value, _ = RelationDistillation("kl")(t, torch.zeros(6), {"teacher": t})
    assert abs(float(value)) < 1e-6


@pytest.fixture(scope="module")
def teacher_run(toy_data: Path, tmp_path_factory) -> Path:
    """A tiny model trained on the toy data: a timmface run directory used as the teacher."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["train", *tiny_run_args(toy_data, run, "total_steps=4", "eval_every=0")]) == 0
    return run


def _student_args(data: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        *tiny_run_args(data, out, "eval_every=0", "save_every=0", "total_steps=5"),
        f"distill.teacher={teacher}",
        "distill.teacher_dtype=float32",
        *extra,
    ]


def test_online_distillation_trains_only_the_student(toy_data: Path, teacher_run: Path, tmp_path: Path):
    cfg = load_config(
        None, _student_args(toy_data, tmp_path / "s", teacher_run, "model.embed_dim=16", "distill.relation_weight=1.0")
    )
    trainer = DistillTrainer(cfg)
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    assert "kd_feature" in trainer.model.terms and trainer.model.terms["kd_feature"].proj is not None
    trainer.fit()
    after = trainer.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    assert not trainer.teacher.training
    lines = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "loss" in m]
    assert all({"margin", "kd_feature", "kd_relation"} <= set(m) for m in train)
    for m in train:  # the total is the weighted sum of the terms
        assert m["loss"] == pytest.approx(m["margin"] + m["kd_feature"] + m["kd_relation"], rel=1e-4)
    # the projection learned, and it is not part of the backbone that gets exported
    from students import create_student

    plain = create_student("test_vit", embed_dim=16, img_size=32).state_dict()
    assert set(trainer.model.backbone.state_dict()) == set(plain)


def _build_cache(teacher_run: Path, data: Path, out: Path) -> Path:
    return out if out.exists() else _run_embed(teacher_run, data, out)


def _run_embed(teacher_run: Path, data: Path, out: Path) -> Path:
    args = [
        "embed",
        "--model",
        str(teacher_run),
        "--data",
        str(data),
        "--out",
        str(out),
        "--cache",
        "--image-size",
        "32",
    ]
    assert main(args) == 0
    return out


def test_cached_and_online_give_the_same_loss(toy_data: Path, teacher_run: Path, tmp_path: Path):
    cache = _run_embed(teacher_run, toy_data, tmp_path / "t.tfemb")
    online = DistillTrainer(load_config(None, _student_args(toy_data, tmp_path / "a", teacher_run)))
    cached = DistillTrainer(
        load_config(None, _student_args(toy_data, tmp_path / "b", teacher_run, f"distill.cache={cache}"))
    )
    assert cached.teacher is None and online.teacher is not None
    cached.model.load_state_dict(online.model.state_dict())
    batch = next(online.loader)
    assert batch.flips.any() and not batch.flips.all()  # both views are exercised
    outs = []
    for tr in (online, cached):
        x, labels, flips = tr.to_device(batch)
        targets = tr.targets(batch, x, flips)
        tr.model.train()
        with torch.no_grad():
            outs.append((tr.model(x, labels, targets), targets["teacher"]))
    (o1, t1), (o2, t2) = outs
    torch.testing.assert_close(t2, t1, rtol=2e-3, atol=2e-3)  # float16 storage
    assert float(o1["kd_feature"]) == pytest.approx(float(o2["kd_feature"]), abs=1e-4)
    assert float(o1["loss"]) == pytest.approx(float(o2["loss"]), rel=1e-4)


def test_cache_mismatches_are_refused(toy_data: Path, teacher_run: Path, tmp_path: Path):
    from tests.conftest import write_toy_dataset

    cache = _run_embed(teacher_run, toy_data, tmp_path / "t.tfemb")
    other = write_toy_dataset(tmp_path / "other", num_classes=8, per_class=5)
    with pytest.raises(DataError, match="t.tfemb"):
        DistillTrainer(load_config(None, _student_args(other, tmp_path / "x", teacher_run, f"distill.cache={cache}")))
    with pytest.raises(ConfigError, match="augmentations"):
        DistillTrainer(
            load_config(
                None,
                _student_args(
                    toy_data,
                    tmp_path / "y",
                    teacher_run,
                    f"distill.cache={cache}",
                    "data.augmentations=[{name: RandomAffine, args: [5]}]",
                ),
            )
        )


def test_bad_combinations(toy_data: Path, teacher_run: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="allow_projection"):
        DistillTrainer(
            load_config(
                None,
                _student_args(
                    toy_data, tmp_path / "a", teacher_run, "model.embed_dim=16", "distill.allow_projection=false"
                ),
            )
        )
    with pytest.raises(ConfigError, match="needs a teacher"):
        DistillTrainer(load_config(None, tiny_run_args(toy_data, tmp_path / "b")))
    with pytest.warns(UserWarning, match="plain training"):
        DistillTrainer(
            load_config(None, _student_args(toy_data, tmp_path / "c", teacher_run, "distill.feature_weight=0"))
        )


def test_teacher_centres(toy_data: Path, teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from teachers import load_teacher
    from timmface.data.recordio import RecordIODataset

    ds = RecordIODataset(toy_data)
    teacher = load_teacher(teacher_run)
    centres = compute_teacher_centres(ds, ds.num_classes, teacher=teacher, batch_size=7, image_size=32, progress=True)
    # the pass over the dataset says how far it is (at real scale it is as long as an embed run)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("teacher class centres: ")]
    assert lines and lines[-1].startswith(f"teacher class centres: {len(ds)}/{len(ds)} (100.0%)"), lines
    # direct: per class, normalised mean of normalised embeddings
    with torch.no_grad():
        emb = torch.cat([teacher(torch.stack([ds[i][0] for i in range(len(ds))]).float() / 127.5 - 1)])
    emb = F.normalize(emb, dim=1)
    labels = torch.as_tensor(np.asarray(ds.labels))
    for c in range(ds.num_classes):
        expected = F.normalize(emb[labels == c].mean(0), dim=0)
        torch.testing.assert_close(centres[c], expected, rtol=1e-4, atol=1e-5)

    frozen = DistillTrainer(
        load_config(None, _student_args(toy_data, tmp_path / "f", teacher_run, "distill.centres=frozen"))
    )
    torch.testing.assert_close(frozen.model.head.weight.detach(), centres, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "f" / "teacher_centres.safetensors").is_file()
    frozen.fit()
    torch.testing.assert_close(frozen.model.head.weight.detach(), centres, rtol=1e-4, atol=1e-5)

    ema = DistillTrainer(
        load_config(
            None,
            _student_args(toy_data, tmp_path / "e", teacher_run, "distill.centres=ema", "distill.centres_momentum=0.5"),
        )
    )
    ema.fit()
    w = ema.model.head.weight.detach()
    assert not torch.allclose(w, centres, atol=1e-4)  # moved by the batches' teacher embeddings
    torch.testing.assert_close(w.norm(dim=1), torch.ones(len(w)))


def test_distillation_resume_equals_uninterrupted(toy_data: Path, teacher_run: Path, tmp_path: Path):
    extra = ["distill.relation_weight=0.5", "distill.relation_loss=kl", "distill.centres=ema", "total_steps=6"]

    def make(out: Path, more: list[str]) -> DistillTrainer:
        return DistillTrainer(load_config(None, _student_args(toy_data, out, teacher_run, *extra, *more)))

    whole, second = whole_and_resumed(make, tmp_path / "a", tmp_path / "b", until=3)

    def losses(run: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert_same_weights(whole.model, second.model)


def test_distill_cli_teacher_flag(toy_data: Path, teacher_run: Path, tmp_path: Path, capsys):
    args = ["distill", "--teacher", str(teacher_run), *tiny_run_args(toy_data, tmp_path / "r", "total_steps=2")]
    assert main(args) == 0
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert f"teacher: {teacher_run}" in saved
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(tmp_path / "missing.pth"),
                *tiny_run_args(toy_data, tmp_path / "r2", "total_steps=2"),
            ]
        )
        == 2
    )
    assert "missing.pth" in capsys.readouterr().err
