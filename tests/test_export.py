"""``timmface export``: a run's backbone as a timm hub folder (+ ONNX, + Hub upload), read back by plain timm."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_run_args, write_toy_dataset
from tests.test_eval_cli import fake_run
from timmface.checkpoint import list_checkpoints
from timmface.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real few-step training run (EMA active from step 2, so its EMA differs from the live weights)."""
    root = tmp_path_factory.mktemp("export")
    data = write_toy_dataset(root / "toy")
    run = root / "run"
    assert main(["train", *tiny_run_args(data, run)]) == 0
    return run


def _ckpt(run: Path) -> dict:
    return torch.load(list_checkpoints(run)[-1][1], weights_only=True)


def _run_backbone(run: Path) -> torch.nn.Module:
    from timmface.export import load_run_model

    return load_run_model(run).backbone


def test_timm_reads_the_folder_back_with_the_ema_weights(trained: Path, tmp_path: Path, capsys):
    import timm

    out = tmp_path / "hub"
    assert main(["export", str(trained), "--out", str(out)]) == 0
    assert "ema weights" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "test_vit" and cfg["num_classes"] == 32  # num_classes = the embedding size
    assert cfg["model_args"]["img_size"] in (32, [32, 32])  # the run's model.kwargs (timm writes sizes as pairs)
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [3, 112, 112] and pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3
    assert pre["crop_pct"] == 1.0 and pre["crop_mode"] == "center" and pre["interpolation"] == "bilinear"
    assert pre["num_classes"] == 32 and "license" not in pre and "tag" not in pre  # not timm's ImageNet weights

    ckpt = _ckpt(trained)
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(ckpt["ema"])
    assert all(torch.equal(weights[k], ckpt["ema"][k]) for k in weights)  # the EMA, not the live weights
    assert not all(torch.equal(weights[k], ckpt["model"][k]) for k in weights)
    assert not any(k.startswith("head.weight") and v.shape[0] != 32 for k, v in weights.items())  # no class centres

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # plain timm, offline
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        a, b = model(x), _run_backbone(trained)(x)
    assert torch.nn.functional.cosine_similarity(a, b).min() >= 0.99999

    card = (out / "README.md").read_text()
    best = max(json.loads(line).get("acc/toy_val", -1) for line in (trained / "metrics.jsonl").read_text().splitlines())
    assert f"| toy_val | {100 * best:.2f}" in card and "Accuracy-Flip" in card
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in card and "batch_size: 8" in card
    assert "import students" not in card  # test_vit is a stock timm model


def test_no_ema_exports_the_live_weights(trained: Path, tmp_path: Path):
    out = tmp_path / "live"
    assert main(["export", str(trained), "--out", str(out), "--no-ema"]) == 0
    weights, ckpt = load_file(str(out / "model.safetensors")), _ckpt(trained)
    assert all(torch.equal(weights[k], ckpt["model"][k]) for k in weights)


def test_face_variant_card_says_to_import_students(tmp_path: Path):
    import timm

    run = fake_run(tmp_path / "run", model=["model.backbone=face_resnet18", "model.embed_dim=16"])
    out = tmp_path / "hub"
    assert main(["export", str(run), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "import students" in card and "face_resnet18" in card
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # students is imported in this process
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(model(x), _run_backbone(run)(x)).min() >= 0.99999


def test_onnx_has_a_dynamic_batch_and_matches_torch(trained: Path, tmp_path: Path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "hub"
    assert main(["export", str(trained), "--out", str(out), "--onnx"]) == 0
    assert "model.onnx matches PyTorch" in capsys.readouterr().out
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 112, 112]
    model = _run_backbone(trained)
    for n in (1, 3):
        x = torch.rand(n, 3, 112, 112) * 2 - 1
        got = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (n, 32) and abs(got - want).max() <= 1e-4
    assert "## ONNX" in (out / "README.md").read_text()


def test_onnx_without_the_extra_is_one_line_naming_it(trained: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    out = tmp_path / "hub"
    assert main(["export", str(trained), "--out", str(out), "--onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "onnxruntime" in err and "timmface[onnx]" in err and "\n" not in err
    assert not out.exists()


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls and what the folder held at upload time."""

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs) -> str:
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs) -> None:
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        FakeHfApi.calls.append(("upload_folder", {**kwargs, "files": files}))


def test_push_to_hub_uploads_the_folder(trained: Path, tmp_path: Path, monkeypatch, capsys):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    out = tmp_path / "hub"
    assert main(["export", str(trained), "--out", str(out), "--push-to-hub", "me/face-vit", "--private"]) == 0
    (name1, create), (name2, upload) = FakeHfApi.calls
    assert name1 == "create_repo" and create["repo_id"] == "me/face-vit" and create["exist_ok"] and create["private"]
    assert name2 == "upload_folder" and upload["repo_id"] == "me/face-vit" and upload["folder_path"] == str(out)
    assert upload["files"] == ["README.md", "config.json", "model.safetensors"]
    assert 'timm.create_model("hf-hub:me/face-vit", pretrained=True)' in (out / "README.md").read_text()
    assert "uploaded to https://huggingface.co/me/face-vit" in capsys.readouterr().out

    FakeHfApi.calls = []
    assert main(["export", str(trained), "--out", str(tmp_path / "x"), "--push-to-hub", "not-a-repo-id"]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err and FakeHfApi.calls == [] and not (tmp_path / "x").exists()


def test_bad_input_is_one_line(trained: Path, tmp_path: Path, capsys):
    empty_run = tmp_path / "norun"
    empty_run.mkdir()
    (empty_run / "config.yaml").write_text("output_dir: norun\n")
    assert main(["export", str(empty_run), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no checkpoint" in err and str(empty_run) in err and "\n" not in err

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(trained), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists" in err and "--overwrite" in err and "\n" not in err
    assert (out / "keep.txt").read_text() == "mine"  # untouched

    assert main(["export", str(trained), "--out", str(trained.parent), "--overwrite"]) == 2  # would delete the run
    assert "lives inside it" in capsys.readouterr().err and list_checkpoints(trained)

    assert main(["export", str(trained), "--out", str(out), "--overwrite"]) == 2  # not a previous export
    err = capsys.readouterr().err.strip()
    assert "keep.txt" in err and "\n" not in err and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert main(["export", str(trained), "--out", str(out)]) == 0  # an empty folder is free
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
