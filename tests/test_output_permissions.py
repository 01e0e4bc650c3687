"""Every file and folder timmface writes gets the permissions the user's umask gives a newly created one (what
``open()`` / ``mkdir`` give): the same for all outputs, private under ``umask 077``, shared under ``umask 022``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.conftest import tiny_run_args, write_toy_dataset
from tests.test_data_safety import _image_folder
from tests.test_eval_cli import fake_run
from timmface.cli import main

UMASK = 0o027  # distinguishes "as the umask says" (0640 / 0750) from a fixed 0644 / 0755 and from 0600


def _modes(root: Path, before: set[Path]) -> dict[str, str]:
    """``{relative path: octal mode}`` of everything under ``root`` that is not in ``before``."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p not in before and not p.is_symlink():
                found[str(p.relative_to(root))] = oct(stat.S_IMODE(p.stat().st_mode))
    return found


@pytest.mark.slow
def test_every_output_gets_the_umask_permissions(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TIMMFACE_CACHE", str(tmp_path / "cache"))
    data = write_toy_dataset(tmp_path / "toy", num_classes=4, per_class=4)
    faces = tmp_path / "faces"
    _image_folder(faces, ["alice", "bob"])
    run = fake_run(tmp_path / "teacher")
    before = set(tmp_path.rglob("*"))
    old = os.umask(UMASK)
    try:
        steps = [
            ["train", *tiny_run_args(data, tmp_path / "run")],
            ["report", str(tmp_path / "run")],
            ["distill", "--teacher", str(run), *tiny_run_args(data, tmp_path / "drun", "distill.centres=init")],
            ["export", str(run), "--out", str(tmp_path / "hub")],
            ["embed", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "e.safetensors")],
            ["embed", "--model", str(run), "--data", str(faces), "--out", str(tmp_path / "e.npy")],
            ["embed", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "e.tfemb")],
            ["eval", "--model", str(run), "--bins", str(data / "toy_val.bin"), "--json", str(tmp_path / "ev.json")],
            ["data", "pack", str(faces), str(tmp_path / "packed")],
            ["data", "shards", str(data), str(tmp_path / "shards" / "s-%06d.tar"), "--max-count", "10"],
            ["ckpt", "merge", str(run), "--out", str(tmp_path / "merged.pt")],
        ]
        for argv in steps:
            if argv[0] in ("embed", "eval"):
                argv += ["--workers", "0"]
            assert main(argv) == 0, argv
    finally:
        os.umask(old)
    modes = _modes(tmp_path, before)
    expected_file, expected_dir = oct(0o666 & ~UMASK), oct(0o777 & ~UMASK)
    wrong = {p: m for p, m in modes.items() if m != (expected_dir if (tmp_path / p).is_dir() else expected_file)}
    outputs = ["hub/model.safetensors", "drun/teacher_centres.safetensors", "e.safetensors", "e.npy", "e.tfemb",
               "ev.json", "run/report.txt", "run/metrics.jsonl", "packed/train.rec", "shards/s-000000.tar",
               "merged.pt", "hub"]  # fmt: skip
    for must in outputs:
        assert must in modes, must
    assert not wrong, f"expected files {expected_file}, folders {expected_dir}: {wrong}"
