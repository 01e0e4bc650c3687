"""The real trainer on tiny data: logs, checkpoints, exact resume, EMA evaluation, bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import assert_same_weights, class_image, tiny_run_args, whole_and_resumed
from timmface.checkpoint import list_checkpoints, load_checkpoint
from timmface.cli import main
from timmface.config import load_config
from timmface.evaluation import evaluate_bin
from timmface.trainer import Trainer


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_cli_writes_config_metrics_and_checkpoints(toy_data: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_run_args(toy_data, run)]) == 0
    out = capsys.readouterr().out
    assert "acc/toy_val=" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["output_dir"] == str(run) and saved["model"]["backbone"] == "test_vit"
    lines = _metrics(run)
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "margin", "lr", "img_per_s", "grad_norm"} <= set(m) for m in train_lines)
    evals = [m for m in lines if "acc/toy_val" in m]
    assert [m["step"] for m in evals] == [3, 6]
    assert all(0.0 <= m["acc/toy_val"] <= 1.0 for m in evals)  # a fraction, not percent
    # learning happened: the loss went down and the learning rate followed the cosine schedule
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert train_lines[0]["lr"] > train_lines[-1]["lr"]
    steps = [s for s, _ in list_checkpoints(run)]
    assert steps == [3, 6]
    ckpt = torch.load(list_checkpoints(run)[-1][1], weights_only=True)
    assert ckpt["config"] == saved and ckpt["step"] == 6
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["ema"] is not None and set(ckpt["ema"]) == set(ckpt["model"])


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["loss.name=adaface", "head.partial_fc=0.5", "data.num_workers=2", "optim.grad_accum=2",
         "data.augmentations=[{name: RandomAffine, args: [10]}]"],
        ["loss.name=arcface", "optim.name=sgd", "optim.lr=0.05", "amp=bfloat16"],
    ],
    ids=["cosface", "adaface-pfc-workers-accum-aug", "arcface-sgd-bf16"],
)  # fmt: skip
def test_resume_gives_the_same_run(toy_data: Path, tmp_path: Path, extra: list[str]):
    def make(out: Path, more: list[str]) -> Trainer:
        base = tiny_run_args(toy_data, out, "save_every=0", "total_steps=8", "eval_every=0")
        return Trainer(load_config(None, [*base, *extra, *more]))

    whole, second = whole_and_resumed(make, tmp_path / "a", tmp_path / "b", until=3)
    reference = [m["loss"] for m in _metrics(tmp_path / "a") if "loss" in m]
    resumed = [m["loss"] for m in _metrics(tmp_path / "b") if "loss" in m]
    assert resumed == reference  # exactly the same losses, step by step
    assert_same_weights(whole.model, second.model)
    assert torch.equal(whole.ema.module.state_dict()["head.weight"], second.ema.module.state_dict()["head.weight"])


def test_evaluation_uses_ema_weights(toy_data: Path, tmp_path: Path):
    t = Trainer(load_config(None, tiny_run_args(toy_data, tmp_path / "r", "eval_every=0", "ema.decay=0.5")))
    t.fit()
    assert t.ema.active
    live = evaluate_bin(t.model.backbone, toy_data / "toy_val.bin", image_size=32)
    ema = evaluate_bin(t.ema.module, toy_data / "toy_val.bin", image_size=32)
    got = t.evaluate()
    assert got["acc/toy_val"] == pytest.approx(ema.accuracy)
    assert got["threshold/toy_val"] == pytest.approx(ema.threshold)
    # the two weight sets really differ, so the check above is meaningful
    assert any(
        not torch.equal(a, b)
        for a, b in zip(t.model.backbone.state_dict().values(), t.ema.module.state_dict().values())
    )
    assert live.accuracy >= 0.0


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_data_path_is_one_line(tmp_path: Path, capsys):
    assert main(["train", *tiny_run_args(tmp_path / "nowhere", tmp_path / "r")]) == 2
    line = _error_line(capsys)
    assert str(tmp_path / "nowhere") in line and "not found" in line


def test_unknown_key_from_cli(toy_data: Path, tmp_path: Path, capsys):
    assert main(["train", *tiny_run_args(toy_data, tmp_path / "r"), "optim.learning_rate=1"]) == 2
    assert "unknown config key 'optim.learning_rate'" in _error_line(capsys)


def test_resume_with_a_different_model_is_refused(toy_data: Path, tmp_path: Path, capsys):
    run = tmp_path / "r"
    assert main(["train", *tiny_run_args(toy_data, run, "total_steps=2")]) == 0
    capsys.readouterr()
    code = main(["train", *tiny_run_args(toy_data, run, "total_steps=4", "model.embed_dim=16", "resume=auto")])
    assert code == 2
    line = _error_line(capsys)
    assert "model differs" in line and "model.embed_dim: 32 -> 16" in line and "step_00000002.pt" in line


def test_existing_run_is_not_overwritten(toy_data: Path, tmp_path: Path, capsys):
    run = tmp_path / "r"
    assert main(["train", *tiny_run_args(toy_data, run, "total_steps=2")]) == 0
    before = load_checkpoint(list_checkpoints(run)[-1][1])["model"]
    capsys.readouterr()
    assert main(["train", *tiny_run_args(toy_data, run, "total_steps=2")]) == 2
    assert "already holds checkpoints" in _error_line(capsys)
    after = load_checkpoint(list_checkpoints(run)[-1][1])["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert main(["train", *tiny_run_args(toy_data, run, "total_steps=2", "overwrite=true")]) == 0


def _corrupt_one_jpeg(src: Path, dst: Path, key: int) -> None:
    """Copy a RecordIO folder and overwrite the JPEG body of record ``key`` with garbage."""
    import shutil

    shutil.copytree(src, dst)
    offsets = dict(line.split("\t") for line in (dst / "train.idx").read_text().split("\n") if line)
    off = int(offsets[str(key)])
    data = bytearray((dst / "train.rec").read_bytes())
    (length,) = struct.unpack("<I", data[off + 4 : off + 8])
    length &= (1 << 29) - 1
    start = off + 8 + 24 + 20  # past the IRHeader, into the JPEG's headers
    data[start : off + 8 + length] = bytes(len(data[start : off + 8 + length]))
    (dst / "train.rec").write_bytes(bytes(data))


def test_corrupt_jpeg_is_skipped_and_counted(toy_data: Path, tmp_path: Path):
    bad = tmp_path / "bad"
    _corrupt_one_jpeg(toy_data, bad, key=5)
    run = tmp_path / "r"
    args = tiny_run_args(bad, run, "total_steps=12", "data.max_bad_fraction=0.5")
    assert main(["train", *args]) == 0
    counts = [m["data/bad_records"] for m in _metrics(run) if "data/bad_records" in m]
    assert counts[-1] == 2  # 12 steps x 8 = two epochs of 48 images: the bad record was met twice


def test_corrupt_jpeg_over_the_limit_stops_naming_the_record(toy_data: Path, tmp_path: Path, capsys):
    bad = tmp_path / "bad"
    _corrupt_one_jpeg(toy_data, bad, key=5)
    assert main(["train", *tiny_run_args(bad, tmp_path / "r", "total_steps=12", "data.max_bad_fraction=0")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "failed to decode" in line and "key 5" in line and str(bad) in line


def test_class_image_is_deterministic():
    assert torch.equal(class_image(3, 1), class_image(3, 1))
    assert not torch.equal(class_image(3, 1), class_image(4, 1))
