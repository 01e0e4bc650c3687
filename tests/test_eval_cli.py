"""``timmface eval``: the CLI reproduces evaluate_bin / evaluate_ijb on the weights it should load (EMA of a run)."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, write_toy_dataset
from timmface.checkpoint import save_checkpoint
from timmface.cli import main
from timmface.config import load_config
from timmface.evaluation.verification import evaluate_bin

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(
    root: Path, *overrides: str, model: list[str] = TINY_MODEL, seed: int = 0, ema: bool = True, step: int = 7
) -> Path:
    """A run directory holding one real checkpoint (trainer format) of a random ``test_vit``; its EMA differs.

    Writing the checkpoint directly (instead of training) gives weights whose verification accuracy is not
    saturated, so flip / no flip and EMA / live weights give different numbers.
    """
    from students import create_student

    cfg = load_config(None, [f"output_dir={root}", *model, *overrides])
    m = cfg.model
    torch.manual_seed(seed)
    model = create_student(m.backbone, embed_dim=m.embed_dim, **m.kwargs)
    averaged = copy.deepcopy(model)
    with torch.no_grad():
        for p in averaged.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {"config": asdict(cfg), "num_classes": 8, "model": model.state_dict(), "metrics": {}}
    state["ema"] = averaged.state_dict() if ema else None
    save_checkpoint(state, root, step)
    return root


def backbone_of(run: Path, which: str = "ema") -> torch.nn.Module:
    """The run's backbone rebuilt by hand from the checkpoint (independently of timmface.export)."""
    from students import create_student

    ckpt = torch.load(next((run / "checkpoints").glob("step_*.pt")), weights_only=True)
    m = ckpt["config"]["model"]
    model = create_student(m["backbone"], embed_dim=m["embed_dim"], **m["kwargs"])
    model.load_state_dict(ckpt[which])
    return model.eval()


def hard_bin(path: Path, pairs: int = 60, noise: float = 60.0, size: int = 32) -> Path:
    """A ``.bin`` whose pairs a random network separates only partly (accuracy ~0.95, thresholds > 0.01).

    Both images of a pair are a smooth random pattern plus strong pixel noise; "same" pairs share the pattern. The
    toy set of conftest is separated perfectly even by random weights, so every variant would score 1.0 there.
    """
    from torchvision.io import encode_png

    from timmface.data.bin import write_bin

    g = torch.Generator().manual_seed(7)

    def pattern() -> torch.Tensor:
        small = torch.randint(0, 256, (1, 3, 4, 4), generator=g).float()
        return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)[0]

    def png(base: torch.Tensor) -> bytes:
        img = (base + torch.randn(3, size, size, generator=g) * noise).round().clamp(0, 255).to(torch.uint8)
        return encode_png(img).numpy().tobytes()

    images, issame = [], []
    for i in range(pairs):
        a = pattern()
        b = a if i % 2 == 0 else pattern()
        images += [png(a), png(b)]
        issame.append(i % 2 == 0)
    write_bin(path, images, issame)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_toy_dataset(tmp_path_factory.mktemp("evaldata") / "toy")
    hard_bin(root / "hard.bin")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_run(tmp_path_factory.mktemp("evalrun") / "run")


def _result(r) -> dict:
    return {"accuracy": r.accuracy, "std": r.std, "threshold": r.threshold, "fold_thresholds": r.fold_thresholds}


def _json_result(entry: dict) -> dict:
    return {k: entry[k] for k in ("accuracy", "std", "threshold", "fold_thresholds")}


def test_bin_accuracy_equals_evaluate_bin_on_the_ema_weights(run: Path, data: Path, tmp_path: Path, capsys):
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(run), "--bins", str(data / "hard.bin"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    entry = res["bins"]["hard"]
    # a run's sets are resized to its data.image_size (32 here), as its in-training evaluation does
    ema = evaluate_bin(backbone_of(run, "ema"), data / "hard.bin", image_size=32)
    live = evaluate_bin(backbone_of(run, "model"), data / "hard.bin", image_size=32)
    assert _json_result(entry) == _result(ema)
    assert _result(live) != _result(ema)  # the test can tell which weights were used
    assert entry["fold_accuracies"] == ema.fold_accuracies
    assert entry["protocol"] == "insightface 10-fold, Accuracy-Flip" and entry["flip"] is True
    assert res["model_info"]["weights"] == "ema" and res["model_info"]["architecture"] == "test_vit"
    assert "hard" in printed and "Accuracy-Flip" in printed and f"{100 * ema.accuracy:.2f}" in printed

    # --no-ema evaluates the live weights
    assert main(["eval", "--model", str(run), "--bins", str(data / "hard.bin"), "--json", str(out), "--no-ema"]) == 0
    assert _json_result(json.loads(out.read_text())["bins"]["hard"]) == _result(live)


def test_no_flip_differs_from_flip_and_equals_a_direct_no_flip_evaluation(run: Path, data: Path):
    assert main(["eval", "--model", str(run), "--bins", str(data / "hard.bin"), "--no-flip"]) == 0
    res = json.loads((run / "eval.json").read_text())  # default: next to the model
    entry = res["bins"]["hard"]
    model = backbone_of(run)
    no_flip = evaluate_bin(model, data / "hard.bin", flip=False, image_size=32)
    flip = evaluate_bin(model, data / "hard.bin", flip=True, image_size=32)
    assert _json_result(entry) == _result(no_flip)
    assert _result(no_flip) != _result(flip)
    assert entry["protocol"] == "insightface 10-fold, no flip (timm-face)" and entry["flip"] is False


def test_run_val_sets_are_the_default(data: Path, tmp_path: Path, capsys):
    run = fake_run(tmp_path / "run", f"data.path={data}")
    assert main(["eval", "--model", str(run)]) == 0
    assert "evaluating the run's verification sets" in capsys.readouterr().out
    res = json.loads((run / "eval.json").read_text())
    assert set(res["bins"]) == {"hard", "toy_val"}


def test_a_checkpoint_file_and_a_timm_hub_folder(run: Path, data: Path, tmp_path: Path):
    from timm.models import save_for_hf

    from teachers import load_teacher

    ckpt = next((run / "checkpoints").glob("step_*.pt"))
    assert main(["eval", "--model", str(ckpt), "--bins", str(data / "hard.bin")]) == 0
    by_file = json.loads(ckpt.with_name(ckpt.stem + ".eval.json").read_text())["bins"]["hard"]
    assert _json_result(by_file) == _result(evaluate_bin(backbone_of(run), data / "hard.bin", image_size=32))

    # any teacher format goes through teachers.load_teacher: here a timm hub folder
    hub = tmp_path / "hub"
    save_for_hf(backbone_of(run), str(hub), model_args={"img_size": 32}, safe_serialization=True)
    assert main(["eval", "--model", str(hub), "--bins", str(data / "hard.bin")]) == 0
    res = json.loads((hub / "eval.json").read_text())
    assert res["model_info"]["format"] == "timm_hub"
    expected = evaluate_bin(load_teacher(hub), data / "hard.bin")
    assert _json_result(res["bins"]["hard"]) == _result(expected)


def test_ijb_through_the_cli_equals_evaluate_ijb(run: Path, tmp_path: Path, capsys):
    from tests.test_ijb import build_ijb
    from timmface.evaluation.ijb import evaluate_ijb

    design = build_ijb(tmp_path / "ijb")
    out = tmp_path / "ijb.json"
    args = ["eval", "--model", str(run), "--ijb", str(design.root), "--json", str(out), "--workers", "0"]
    assert main([*args, "--ijb-protocol", "timm-face"]) == 0
    printed = capsys.readouterr().out
    entry = json.loads(out.read_text())["ijb"]["IJBC"]
    expected = evaluate_ijb(design.root, "IJBC", backbone_of(run), protocol="timm-face", num_workers=0, device="cpu")
    assert entry["tar_at_far"] == {f"{far:.0e}": tar for far, tar in expected.tar_at_far.items()}
    assert list(entry["tar_at_far"]) == ["1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"]
    assert entry["protocol"] == expected.protocol and entry["protocol"].startswith("IJBC 1:1, no flip, L2-normalised")
    assert entry["n_pairs"] == expected.n_pairs and entry["n_failed_images"] == len(design.failed)
    png = Path(entry["roc_png"])
    assert png == tmp_path / "ijb_IJBC_roc.png" and png.read_bytes()[:8] == PNG_MAGIC
    assert "IJBC" in printed and "1e-04" in printed


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], dict(flip=True, norm_fusion=False, detector_score=False, interpolation="bilinear")),
        (["--no-flip", "--norm-fusion"], dict(flip=False, norm_fusion=True, detector_score=False)),
        (["--ijb-protocol", "insightface"], dict(flip=True, norm_fusion=True, detector_score=True)),
        (["--ijb-protocol", "timm-face"], dict(flip=False, norm_fusion=False, interpolation="bicubic")),
        (["--ijb-protocol", "adaface", "--no-flip", "--detector-score"], dict(flip=False, detector_score=True)),
        (["--ijb-interpolation", "bicubic"], dict(flip=True, interpolation="bicubic")),
    ],
)
def test_ijb_protocol_flags(flags: list[str], expected: dict):
    from timmface.cli import build_parser
    from timmface.commands.eval import _ijb_protocol

    proto = _ijb_protocol(build_parser().parse_args(["eval", "--model", "m", "--ijb", "d", *flags]))
    assert {k: getattr(proto, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bins", "missing.bin"], "missing.bin: verification set not found"),
        ([], "nothing to evaluate"),
        (["--model", "no/such/model", "--bins"], "no such file or directory"),
    ],
)
def test_bad_input_is_one_line(run: Path, data: Path, argv: list[str], message: str, capsys):
    if argv[:1] == ["--model"]:
        argv = [*argv, str(data / "hard.bin")]
    else:
        argv = ["--model", str(run), *argv]
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("timmface eval: error:") and "\n" not in err
