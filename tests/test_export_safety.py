"""``timmface export``: the ONNX check compares what matters, a failed check still leaves the timm folder, and
``--overwrite`` replaces only a previous export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_eval_cli import fake_run
from timmface.checkpoint import list_checkpoints, save_checkpoint
from timmface.cli import main

TIMM_FILES = ["README.md", "config.json", "model.safetensors"]
# a small CNN: its ONNX export takes a third of test_vit's
CNN = ["model.backbone=test_resnet", "model.embed_dim=32"]


def _one_line(err: str) -> str:
    assert err.startswith("timmface export: error: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_run(tmp_path_factory.mktemp("export_safety") / "run", model=CNN)


@pytest.fixture(scope="module")
def loud_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose embeddings have norms in the tens of thousands, as unnormalised face embeddings can (the demo's
    are ~95): float32 rounding alone then differs by more than 1e-4 between two correct runtimes."""
    root = fake_run(tmp_path_factory.mktemp("export_loud") / "run", model=CNN)
    step, path = list_checkpoints(root)[-1]
    state = torch.load(path, weights_only=True)
    for which in ("model", "ema"):  # test_resnet's classifier is `fc`
        state[which] = {k: v * 30000 if k.startswith("fc.") else v for k, v in state[which].items()}
    header = ("format", "version", "step", "rank_files")  # save_checkpoint writes these itself
    save_checkpoint({k: v for k, v in state.items() if k not in header}, root, step)
    return root


# ------------------------------------------------------------------------------------- item 8: the ONNX check


def test_onnx_check_accepts_large_embeddings_that_agree_in_direction_and_relative_size(
    loud_run: Path, tmp_path: Path, capsys
):
    pytest.importorskip("onnxruntime")
    from timmface.export import load_run_model

    out = tmp_path / "hub"
    code = main(["export", str(loud_run), "--out", str(out), "--onnx"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted([*TIMM_FILES, "model.onnx"])
    line = next(x for x in captured.out.splitlines() if "model.onnx" in x and "checked" in x)
    assert "cosine" in line and "relative" in line

    import numpy as np
    import onnxruntime as ort

    model = load_run_model(loud_run).backbone
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort.InferenceSession(str(out / "model.onnx")).run(None, {"input": x.numpy()})[0]
    assert float(np.linalg.norm(ref, axis=1).min()) > 1000  # the situation the old absolute limit failed on
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert float(rel.max()) < 1e-4


class _WrongSession:
    """An onnxruntime session whose embeddings point elsewhere (a broken export): cosine ~0 with PyTorch's."""

    real: type | None = None  # onnxruntime's own InferenceSession, set by the test before patching it

    def __init__(self, *args, **kwargs) -> None:
        self._session = self.real(*args, **kwargs)

    def get_inputs(self):
        return self._session.get_inputs()

    def run(self, *args, **kwargs):
        (out,) = self._session.run(*args, **kwargs)
        return [out[:, ::-1].copy()]  # same norms, other directions


def test_failed_onnx_check_still_writes_the_timm_folder_and_names_no_temporary_path(
    run: Path, tmp_path: Path, monkeypatch, capsys
):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(_WrongSession, "real", ort.InferenceSession)
    monkeypatch.setattr(ort, "InferenceSession", _WrongSession)
    out = tmp_path / "hub"
    assert main(["export", str(run), "--out", str(out), "--onnx"]) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert f"{out / 'model.onnx'}: not written" in line and "cosine" in line
    assert ".tmp" not in line + captured.out
    assert sorted(p.name for p in out.iterdir()) == TIMM_FILES  # the timm folder is there, without model.onnx
    assert "## ONNX" not in (out / "README.md").read_text()  # the card does not promise the missing file
    assert "config.json" in captured.out  # says what was written


def test_failed_onnx_export_still_writes_the_timm_folder(run: Path, tmp_path: Path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter gave up")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    out = tmp_path / "hub"
    assert main(["export", str(run), "--out", str(out), "--onnx"]) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert f"{out / 'model.onnx'}: not written" in line and "exporter gave up" in line and ".tmp" not in line
    assert sorted(p.name for p in out.iterdir()) == TIMM_FILES


# ------------------------------------------------------------------------ item 15: what --overwrite replaces


def test_overwrite_replaces_a_previous_export(run: Path, tmp_path: Path, capsys):
    out = tmp_path / "hub"
    assert main(["export", str(run), "--out", str(out)]) == 0
    (out / "eval.json").write_text("{}")  # `timmface eval --model hub` writes its results beside the model
    first = (out / "model.safetensors").read_bytes()
    assert main(["export", str(run), "--out", str(out), "--overwrite", "--no-ema"]) == 0
    assert sorted(p.name for p in out.iterdir()) == TIMM_FILES
    assert (out / "model.safetensors").read_bytes() != first  # the live weights this time


@pytest.mark.parametrize(
    "contents",
    [
        {"notes.txt": "mine"},  # any folder
        {"config.json": "{}", "model.safetensors": "x", "README.md": "card", "thesis.tex": "mine"},  # export + more
        {"config.json": "{}", "train.py": "mine"},  # looks half like an export
    ],
)
def test_overwrite_refuses_a_folder_that_is_not_a_previous_export(
    contents: dict[str, str], run: Path, tmp_path: Path, capsys
):
    out = tmp_path / "hub"
    out.mkdir()
    for name, text in contents.items():
        (out / name).write_text(text)
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2
    line = _one_line(capsys.readouterr().err)
    foreign = [n for n in contents if n not in ("config.json", "model.safetensors", "README.md")]
    assert all(n in line for n in foreign), line
    assert {p.name: p.read_text() for p in out.iterdir()} == contents
