"""``timmface eval`` / ``embed`` as a user runs them: a run's own (demo) validation sets, an embedding of nothing,
and progress lines when the output is a log file rather than a terminal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import write_toy_dataset
from tests.test_eval_cli import backbone_of, fake_run, hard_bin
from timmface.cli import main
from timmface.evaluation.verification import evaluate_bin

# a demo small enough to generate in a test (the real one: 250 identities x 40 images, 200 held out)
SMALL_DEMO = [
    "data.demo.enabled=true", "data.demo.num_identities=4", "data.demo.images_per_identity=3",
    "data.demo.num_val_identities=4", "data.demo.num_val_pairs=20",
]  # fmt: skip


def _demo_folder() -> Path:
    """Where `timmface train` puts the demo data of these settings (generated there if missing): its own function."""
    from timmface.config import load_config
    from timmface.trainer import demo_data_path

    return Path(demo_data_path(load_config(None, SMALL_DEMO).data.demo))


# ----------------------------------------------------------------- item 9: the run's own validation sets


def test_eval_of_a_demo_run_finds_demo_val_in_the_cache(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("TIMMFACE_CACHE", str(tmp_path / "cache"))
    run = fake_run(tmp_path / "run", *SMALL_DEMO)
    demo_val = _demo_folder() / "demo_val.bin"  # generated as `timmface train` generates it
    assert demo_val.is_file()
    assert main(["eval", "--model", str(run)]) == 0
    assert str(demo_val) in capsys.readouterr().out
    res = json.loads((run / "eval.json").read_text())
    assert set(res["bins"]) == {"demo_val"}
    expected = evaluate_bin(backbone_of(run), demo_val, image_size=32)  # at the run's data.image_size, as it trained
    assert res["bins"]["demo_val"]["accuracy"] == expected.accuracy
    assert res["bins"]["demo_val"]["fold_thresholds"] == expected.fold_thresholds


def test_eval_of_a_demo_run_regenerates_its_data_when_the_cache_was_cleared(tmp_path: Path, monkeypatch, capsys):
    """The demo data is a deterministic function of the run's settings: the same demo_val.bin comes back."""
    monkeypatch.setenv("TIMMFACE_CACHE", str(tmp_path / "cache"))
    run = fake_run(tmp_path / "run", *SMALL_DEMO)
    assert not (tmp_path / "cache").exists()
    assert main(["eval", "--model", str(run)]) == 0
    out = capsys.readouterr().out
    demo_val = _demo_folder() / "demo_val.bin"
    assert str(demo_val) in out and "demo" in out
    res = json.loads((run / "eval.json").read_text())
    assert res["bins"]["demo_val"]["accuracy"] == evaluate_bin(backbone_of(run), demo_val, image_size=32).accuracy


def test_eval_of_a_run_without_val_sets_says_what_to_give(tmp_path: Path, capsys):
    data = tmp_path / "data"
    write_toy_dataset(data, num_classes=2, per_class=2)
    (data / "toy_val.bin").unlink()
    run = fake_run(tmp_path / "run", f"data.path={data}")
    assert main(["eval", "--model", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timmface eval: error: ") and err.count("\n") == 1
    assert "--bins" in err and str(data) in err  # where it looked, and what to pass


def test_eval_of_a_bin_with_too_few_pairs_is_one_line(tmp_path: Path, capsys):
    run = fake_run(tmp_path / "run")
    small = hard_bin(tmp_path / "small.bin", pairs=6)
    assert main(["eval", "--model", str(run), "--bins", str(small)]) == 2
    err = capsys.readouterr().err
    assert err == f"timmface eval: error: {small}: holds 6 pairs; 10-fold evaluation needs at least 10\n"


# ------------------------------------------------------------------------------ item 11: embedding nothing


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_embed_of_no_readable_image_fails_and_writes_nothing(suffix: str, tmp_path: Path, capsys):
    run = fake_run(tmp_path / "run")
    notes = tmp_path / "notes.txt"
    notes.write_text("Remember to buy milk\nand bread\n")
    work = tmp_path / "out"
    work.mkdir()
    out = work / f"emb{suffix}"
    code = main(["embed", "--model", str(run), "--data", str(notes), "--out", str(out), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("timmface embed: error: ") and err.count("\n") == 1
    assert "0 of 2" in err and "Remember to buy milk" in err and "nothing written" in err
    assert list(work.iterdir()) == []  # no output, no .partial, no .keys.txt


# ---------------------------------------------------------- item 20: progress lines when not on a terminal


def _progress_lines(out: str, label: str) -> list[tuple[int, int]]:
    """``(done, total)`` of every plain progress line for ``label`` (``label: done/total ...``)."""
    return [(int(a), int(b)) for a, b in re.findall(rf"^{re.escape(label)}: (\d+)/(\d+) ", out, flags=re.M)]


def test_embed_prints_progress_lines_from_the_first_batch_on(tmp_path: Path, capsys):
    data = write_toy_dataset(tmp_path / "toy", num_classes=4, per_class=6)  # 24 images, 6 batches of 4
    run = fake_run(tmp_path / "run")
    out = tmp_path / "emb.safetensors"
    args = ["embed", "--model", str(run), "--data", str(data), "--out", str(out), "--workers", "0"]
    assert main([*args, "--batch-size", "4"]) == 0
    lines = _progress_lines(capsys.readouterr().out, "embed")
    assert lines[0] == (4, 24) and lines[-1] == (24, 24)  # at once, not after 30 s of silence; and the end


def test_eval_prints_progress_lines_for_every_set(tmp_path: Path, capsys):
    run = fake_run(tmp_path / "run")
    a = hard_bin(tmp_path / "a.bin", pairs=10)
    b = hard_bin(tmp_path / "b.bin", pairs=12)
    assert main(["eval", "--model", str(run), "--bins", str(a), str(b), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    for label, images in (("eval a", 20), ("eval b", 24)):
        lines = _progress_lines(out, label)
        assert lines and lines[0] == (4, images) and lines[-1] == (images, images), (label, out)
