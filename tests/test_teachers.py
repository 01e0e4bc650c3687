"""Face teachers from insightface iResNet and AdaFace IR checkpoints, auto-detection, bad files, CLI.

Every checkpoint here is written the way upstream writes it, from a key -> shape layout built in this
file from the upstream sources (insightface ``arcface_torch/backbones/iresnet.py``, AdaFace ``net.py``),
not from ``teachers``' own modules; outputs are checked against forward passes written below with
``torch.nn.functional`` only.
"""

from __future__ import annotations

import math
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import teachers
from timmface.cli import main
from timmface.errors import TeacherError

WIDTHS = (64, 128, 256, 512)
IRESNET = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
ADAFACE = {"ir_18": (2, 2, 2, 2), "ir_50": (3, 4, 14, 3), "ir_101": (3, 13, 30, 3)}
Shapes = dict[str, tuple[int, ...]]


# ------------------------------------------------------------------------------------------------
# Upstream key layouts, random weights, reference forwards
# ------------------------------------------------------------------------------------------------


def _bn_shapes(shapes: Shapes, prefix: str, c: int, affine: bool = True) -> None:
    if affine:
        shapes[prefix + "weight"] = (c,)
        shapes[prefix + "bias"] = (c,)
    shapes[prefix + "running_mean"] = (c,)
    shapes[prefix + "running_var"] = (c,)
    shapes[prefix + "num_batches_tracked"] = ()


def iresnet_shapes(layers: tuple[int, ...], embed_dim: int = 512) -> Shapes:
    """arcface_torch IResNet state-dict layout: downsample on the first block of every stage."""
    s: Shapes = {"conv1.weight": (64, 3, 3, 3)}
    _bn_shapes(s, "bn1.", 64)
    s["prelu.weight"] = (64,)
    cin = 64
    for stage, (n, c) in enumerate(zip(layers, WIDTHS), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}."
            _bn_shapes(s, p + "bn1.", cin)
            s[p + "conv1.weight"] = (c, cin, 3, 3)
            _bn_shapes(s, p + "bn2.", c)
            s[p + "prelu.weight"] = (c,)
            s[p + "conv2.weight"] = (c, c, 3, 3)
            _bn_shapes(s, p + "bn3.", c)
            if i == 0:
                s[p + "downsample.0.weight"] = (c, cin, 1, 1)
                _bn_shapes(s, p + "downsample.1.", c)
            cin = c
    _bn_shapes(s, "bn2.", 512)
    s["fc.weight"] = (embed_dim, 512 * 7 * 7)
    s["fc.bias"] = (embed_dim,)
    _bn_shapes(s, "features.", embed_dim)
    return s


def adaface_shapes(layers: tuple[int, ...]) -> Shapes:
    """AdaFace Backbone(112, ir) layout: conv shortcut only where the channel count changes."""
    s: Shapes = {"input_layer.0.weight": (64, 3, 3, 3)}
    _bn_shapes(s, "input_layer.1.", 64)
    s["input_layer.2.weight"] = (64,)
    cin, k = 64, 0
    for n, c in zip(layers, WIDTHS):
        for _ in range(n):
            p = f"body.{k}."
            if cin != c:
                s[p + "shortcut_layer.0.weight"] = (c, cin, 1, 1)
                _bn_shapes(s, p + "shortcut_layer.1.", c)
            _bn_shapes(s, p + "res_layer.0.", cin)
            s[p + "res_layer.1.weight"] = (c, cin, 3, 3)
            _bn_shapes(s, p + "res_layer.2.", c)
            s[p + "res_layer.3.weight"] = (c,)
            s[p + "res_layer.4.weight"] = (c, c, 3, 3)
            _bn_shapes(s, p + "res_layer.5.", c)
            cin, k = c, k + 1
    _bn_shapes(s, "output_layer.0.", 512)
    s["output_layer.3.weight"] = (512, 512 * 7 * 7)
    s["output_layer.3.bias"] = (512,)
    _bn_shapes(s, "output_layer.4.", 512, affine=False)
    return s


def random_weights(shapes: Shapes, seed: int = 0) -> dict[str, Tensor]:
    """Random tensors of these shapes, BN running stats included (mean != 0, var != 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            t = torch.tensor(1234)
        elif k.endswith("running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("running_mean"):
            t = 0.2 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif k.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:  # BN scale or PReLU slope
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        out[k] = t
    return out


def tiny_tensors(shapes: Shapes) -> dict[str, Tensor]:
    """One-element tensors under the right keys: enough for key-level checks, cheap to save."""
    return {k: torch.zeros(1) for k in shapes}


def _bn(x: Tensor, w: dict[str, Tensor], p: str) -> Tensor:
    return F.batch_norm(
        x, w[p + "running_mean"], w[p + "running_var"], w.get(p + "weight"), w.get(p + "bias"), False, 0.0, 1e-5
    )


def ref_iresnet(w: dict[str, Tensor], x: Tensor, layers: tuple[int, ...]) -> Tensor:
    """insightface IResNet.forward in functional ops; input RGB [-1, 1] as is."""
    x = F.prelu(_bn(F.conv2d(x, w["conv1.weight"], padding=1), w, "bn1."), w["prelu.weight"])
    for stage, n in enumerate(layers, start=1):
        for i in range(n):
            p, stride = f"layer{stage}.{i}.", 2 if i == 0 else 1
            out = F.conv2d(_bn(x, w, p + "bn1."), w[p + "conv1.weight"], padding=1)
            out = F.prelu(_bn(out, w, p + "bn2."), w[p + "prelu.weight"])
            out = _bn(F.conv2d(out, w[p + "conv2.weight"], stride=stride, padding=1), w, p + "bn3.")
            if i == 0:
                x = _bn(F.conv2d(x, w[p + "downsample.0.weight"], stride=stride), w, p + "downsample.1.")
            x = out + x
    x = _bn(x, w, "bn2.").flatten(1)
    return _bn(F.linear(x, w["fc.weight"], w["fc.bias"]), w, "features.")


def ref_adaface(w: dict[str, Tensor], x_rgb: Tensor, layers: tuple[int, ...]) -> Tensor:
    """AdaFace Backbone.forward in functional ops on the BGR-flipped input; returns normalised * norm."""
    x = x_rgb.flip(1)
    x = F.prelu(_bn(F.conv2d(x, w["input_layer.0.weight"], padding=1), w, "input_layer.1."), w["input_layer.2.weight"])
    cin, k = 64, 0
    for n, c in zip(layers, WIDTHS):
        for i in range(n):
            p, stride = f"body.{k}.", 2 if i == 0 else 1
            if cin == c:
                shortcut = F.max_pool2d(x, 1, stride)
            else:
                shortcut = _bn(F.conv2d(x, w[p + "shortcut_layer.0.weight"], stride=stride), w, p + "shortcut_layer.1.")
            r = F.conv2d(_bn(x, w, p + "res_layer.0."), w[p + "res_layer.1.weight"], padding=1)
            r = F.prelu(_bn(r, w, p + "res_layer.2."), w[p + "res_layer.3.weight"])
            r = _bn(F.conv2d(r, w[p + "res_layer.4.weight"], stride=stride, padding=1), w, p + "res_layer.5.")
            x, cin, k = r + shortcut, c, k + 1
    x = _bn(x, w, "output_layer.0.").flatten(1)
    x = _bn(F.linear(x, w["output_layer.3.weight"], w["output_layer.3.bias"]), w, "output_layer.4.")
    norm = torch.norm(x, 2, 1, True)
    return torch.div(x, norm) * norm


def lightning_ckpt(backbone: dict[str, Tensor]) -> dict:
    """What PyTorch Lightning 1.8 saves for AdaFace's Trainer: backbone under model., head under head."""
    state = {f"model.{k}": v for k, v in backbone.items()}
    state.update(
        {
            "head.kernel": torch.randn(512, 10),
            "head.t": torch.zeros(1),
            "head.batch_mean": torch.ones(1) * 20,
            "head.batch_std": torch.ones(1) * 100,
        }
    )
    return {
        "epoch": 25,
        "global_step": 123456,
        "pytorch-lightning_version": "1.8.6",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 26, "completed": 25}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}": {"best_model_score": torch.tensor(0.97)}},
        "optimizer_states": [
            {
                "state": {0: {"momentum_buffer": torch.zeros(3)}},
                "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}],
            }
        ],
        "lr_schedulers": [{"milestones": Counter({12: 1, 20: 1, 24: 1}), "gamma": 0.1, "last_epoch": 25}],
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "arch": "ir_18",
            "head": "adaface",
            "m": 0.4,
            "h": 0.333,
            "s": 64.0,
            "t_alpha": 0.01,
            "gpus": 2,
        },
    }


def rgb_batch(n: int = 2, seed: int = 1, size: int = 112) -> Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


@pytest.fixture(scope="module")
def r18(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    """An iResNet-18 ``backbone.pth`` saved as arcface_torch does: torch.save(backbone.state_dict())."""
    weights = random_weights(iresnet_shapes(IRESNET["iresnet18"]))
    path = tmp_path_factory.mktemp("r18") / "backbone.pth"
    torch.save(weights, path)
    return path, weights


@pytest.fixture(scope="module")
def ir18(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    """An AdaFace IR-18 Lightning ``.ckpt``."""
    weights = random_weights(adaface_shapes(ADAFACE["ir_18"]), seed=2)
    path = tmp_path_factory.mktemp("ir18") / "adaface_ir18_webface4m.ckpt"
    torch.save(lightning_ckpt(weights), path)
    return path, weights


# ------------------------------------------------------------------------------------------------
# Formats 1 and 2: outputs match the functional references
# ------------------------------------------------------------------------------------------------


def _assert_frozen(t: torch.nn.Module) -> None:
    assert not t.training and all(not m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())
    t.train()  # a parent's .train() must not switch BatchNorm to batch statistics
    assert not any(m.training for m in t.modules())


def test_iresnet_matches_reference(r18: tuple[Path, dict[str, Tensor]]) -> None:
    path, weights = r18
    t = teachers.load_teacher(path)
    _assert_frozen(t)
    x = rgb_batch()
    out = t(x)
    assert isinstance(out, Tensor) and out.shape == (2, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref_iresnet(weights, x, IRESNET["iresnet18"]), rtol=1e-4, atol=1e-4)
    assert t.embed_dim == 512 and t.input_size == (3, 112, 112)
    info = t.teacher_info
    assert (info["format"], info["architecture"], info["depth"]) == ("insightface_iresnet", "iresnet18", 18)
    expected_params = sum(
        v.numel() for k, v in weights.items() if not k.split(".")[-1].startswith(("running", "num_b"))
    )
    assert info["parameters"] == expected_params
    assert info["input"].startswith("RGB") and info["embed_dim"] == 512 and info["source"] == str(path)


def test_iresnet_model_pt_and_module_prefix(r18: tuple[Path, dict[str, Tensor]], tmp_path: Path) -> None:
    """``model.pt`` (same layout), and a DDP ``module.`` prefix, load the same teacher."""
    _, weights = r18
    path = tmp_path / "model.pt"
    torch.save({f"module.{k}": v for k, v in weights.items()}, path)
    x = rgb_batch(1)
    torch.testing.assert_close(
        teachers.load_teacher(path)(x), ref_iresnet(weights, x, IRESNET["iresnet18"]), rtol=1e-4, atol=1e-4
    )


def test_adaface_lightning_ckpt_matches_reference(ir18: tuple[Path, dict[str, Tensor]]) -> None:
    path, weights = ir18
    t = teachers.load_teacher(path)
    _assert_frozen(t)
    x = rgb_batch()
    out = t(x)
    torch.testing.assert_close(out, ref_adaface(weights, x, ADAFACE["ir_18"]), rtol=1e-4, atol=1e-4)
    # the teacher flips RGB -> BGR: on the RGB input as is the reference differs
    assert not torch.allclose(out, ref_adaface(weights, x.flip(1), ADAFACE["ir_18"]), atol=1e-2)
    info = t.teacher_info
    assert (info["format"], info["architecture"], info["depth"]) == ("adaface_ir", "ir_18", 18)
    assert info["parameters"] == 24_020_352  # timm-face's README lists AdaFace IR-18 at 24,020,352
    assert info["input"].startswith("BGR")


@pytest.mark.parametrize("layout", ["bare_state_dict", "plain_with_prefix", "plain"])
def test_adaface_other_containers(ir18: tuple[Path, dict[str, Tensor]], tmp_path: Path, layout: str) -> None:
    _, weights = ir18
    prefixed = {f"model.{k}": v for k, v in weights.items()}
    obj = {"bare_state_dict": {"state_dict": prefixed}, "plain_with_prefix": prefixed, "plain": weights}[layout]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    x = rgb_batch(1)
    torch.testing.assert_close(
        teachers.load_teacher(path)(x), ref_adaface(weights, x, ADAFACE["ir_18"]), rtol=1e-4, atol=1e-4
    )


def test_safetensors_state_dict(r18: tuple[Path, dict[str, Tensor]], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    _, weights = r18
    path = tmp_path / "weights.bin"  # the extension says nothing: detection reads the bytes
    save_file(weights, str(path))
    x = rgb_batch(1)
    torch.testing.assert_close(
        teachers.load_teacher(path)(x), ref_iresnet(weights, x, IRESNET["iresnet18"]), rtol=1e-4, atol=1e-4
    )


# ------------------------------------------------------------------------------------------------
# Architecture detection over every listed depth (from key -> shape dicts: no forward, no big files)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(IRESNET))
def test_detects_every_iresnet_depth(name: str) -> None:
    shapes = {k: torch.Size(v) for k, v in iresnet_shapes(IRESNET[name]).items()}
    spec = teachers.detect_architecture(shapes)
    assert (spec.family, spec.name, spec.layers, spec.embed_dim) == ("insightface_iresnet", name, IRESNET[name], 512)
    assert spec.depth == int(name.removeprefix("iresnet"))


@pytest.mark.parametrize("name", list(ADAFACE))
def test_detects_every_adaface_depth(name: str) -> None:
    shapes = {f"model.{k}": torch.Size(v) for k, v in adaface_shapes(ADAFACE[name]).items()}
    shapes["head.kernel"] = torch.Size((512, 1000))
    spec = teachers.detect_architecture(shapes)
    assert (spec.family, spec.name, spec.layers, spec.prefix) == ("adaface_ir", name, ADAFACE[name], "model.")


def test_detected_architecture_builds_with_the_upstream_keys() -> None:
    """The modules teachers builds for r200 / IR-101 have exactly upstream's keys and shapes (on meta)."""
    from teachers.adaface import AdaFaceIR
    from teachers.iresnet import IResNet

    with torch.device("meta"):
        r200 = IResNet(IRESNET["iresnet200"]).state_dict()
        ir101 = AdaFaceIR(ADAFACE["ir_101"]).state_dict()
    assert {k: tuple(v.shape) for k, v in r200.items()} == iresnet_shapes(IRESNET["iresnet200"])
    assert {k: tuple(v.shape) for k, v in ir101.items()} == adaface_shapes(ADAFACE["ir_101"])


def test_arch_override(r18: tuple[Path, dict[str, Tensor]]) -> None:
    path, _ = r18
    assert teachers.load_teacher(path, arch="r18").teacher_info["architecture"] == "iresnet18"
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher(path, arch="iresnet34")
    message = assert_one_line(e)
    assert "iresnet34" in message and "missing" in message and "layer1.2." in message
    with pytest.raises(
        TeacherError, match="arch='ir_18' is an adaface_ir architecture but the keys are insightface_iresnet's"
    ):
        teachers.load_teacher(path, arch="ir_18")
    with pytest.raises(TeacherError, match="unknown teacher architecture 'resnet9000'"):
        teachers.load_teacher(path, arch="resnet9000")


# ------------------------------------------------------------------------------------------------
# Bad input: one line each
# ------------------------------------------------------------------------------------------------


def test_truncated_files(tmp_path: Path) -> None:
    weights = tiny_tensors(iresnet_shapes(IRESNET["iresnet18"]))
    for legacy in (False, True):
        full = tmp_path / f"full{legacy}.pth"
        torch.save(weights, full, _use_new_zipfile_serialization=not legacy)
        cut = tmp_path / f"cut{legacy}.pth"
        data = full.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(TeacherError) as e:
            teachers.load_teacher(cut)
        message = assert_one_line(e)
        assert str(cut) in message and "truncated or corrupt" in message


def test_missing_and_extra_keys_are_named(tmp_path: Path) -> None:
    weights = tiny_tensors(iresnet_shapes(IRESNET["iresnet18"]))
    del weights["layer2.1.bn3.weight"], weights["fc.bias"]
    weights["layer1.0.se.fc1.weight"] = torch.zeros(1)
    path = tmp_path / "backbone.pth"
    torch.save(weights, path)
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher(path)
    message = assert_one_line(e)
    assert "missing 2 keys (layer2.1.bn3.weight, fc.bias)" in message
    assert "1 unexpected keys (layer1.0.se.fc1.weight)" in message and str(path) in message


def test_wrong_shapes_are_named(tmp_path: Path) -> None:
    path = tmp_path / "backbone.pth"
    torch.save(tiny_tensors(iresnet_shapes(IRESNET["iresnet18"])), path)
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher(path)
    assert "wrong shapes (conv1.weight (1,) != (64, 3, 3, 3)" in assert_one_line(e)


@pytest.mark.parametrize("family", ["iresnet", "adaface"])
def test_unknown_depth(tmp_path: Path, family: str) -> None:
    if family == "iresnet":
        shapes = iresnet_shapes((2, 2, 3, 2))
    else:
        shapes = {f"model.{k}": v for k, v in adaface_shapes((3, 4, 5, 3)).items()}
    path = tmp_path / "w.pth"
    torch.save(tiny_tensors(shapes), path)
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher(path)
    message = assert_one_line(e)
    counts = "[2, 2, 3, 2]" if family == "iresnet" else "[3, 4, 5, 3]"
    assert f"blocks per stage {counts} match no known depth" in message
    assert ("iresnet50 [3, 4, 14, 3]" if family == "iresnet" else "ir_101 [3, 13, 30, 3]") in message


class _Payload:
    """Unpickling this runs code that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_code_executing_pickle_is_refused(tmp_path: Path) -> None:
    # the payload is live: a plain pickle.loads runs it
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live)))
    assert live.exists()

    marker = tmp_path / "pwned"
    as_torch = tmp_path / "backbone.pth"  # torch.save's zip container
    torch.save({"state_dict": _Payload(marker), "conv1.weight": torch.zeros(1)}, as_torch)
    as_pickle = tmp_path / "model.pt"  # a bare pickle stream
    as_pickle.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    for path in (as_torch, as_pickle):
        with pytest.raises(TeacherError) as e:
            teachers.load_teacher(path)
        message = assert_one_line(e)
        assert "refused to unpickle" in message and "exec" in message and "nothing was run" in message
    assert not marker.exists()


def test_unrecognised_files_list_supported_formats(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("hello, not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2), "decoder.weight": torch.zeros(2)}, other)
    int_keys = tmp_path / "int_keys.pt"
    torch.save({0: torch.zeros(1), "fc.weight": torch.zeros(1)}, int_keys)
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], a_list)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    for path, found in (
        (text, "bytes starting b'hello"),
        (other, "encoder.weight, decoder.weight"),
        (int_keys, "2 entries (0, fc.weight)"),
        (a_list, "a PyTorch file holding list"),
        (empty, "empty folder"),
    ):
        with pytest.raises(TeacherError) as e:
            teachers.load_teacher(path)
        message = assert_one_line(e)
        assert found in message and "supported:" in message and "timm hub folder" in message and "ONNX" in message
    with pytest.raises(TeacherError, match="no such file"):
        teachers.load_teacher(tmp_path / "missing.pth")


# ------------------------------------------------------------------------------------------------
# Fingerprint and CLI
# ------------------------------------------------------------------------------------------------


def test_fingerprint_depends_on_bytes_only(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.pth", tmp_path / "b.pt", tmp_path / "c.pth"
    weights = tiny_tensors(iresnet_shapes(IRESNET["iresnet18"]))
    torch.save(weights, a)
    b.write_bytes(a.read_bytes())
    weights["fc.bias"] = torch.ones(1)
    torch.save(weights, c)
    fa = teachers.teacher_fingerprint(a)
    assert len(fa) == 16 and int(fa, 16) >= 0
    assert fa == teachers.teacher_fingerprint(b) == teachers.teacher_fingerprint(str(a))
    assert fa != teachers.teacher_fingerprint(c)


def test_cli_inspect(ir18: tuple[Path, dict[str, Tensor]], capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = ir18
    assert main(["teachers", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("adaface_ir", "ir_18", "24,020,352", "BGR", "512", "112 x 112", "Lightning"):
        assert text in out, text
    assert teachers.teacher_fingerprint(path) in out


def test_cli_inspect_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 10)
    assert main(["teachers", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("timmface teachers inspect: error:") and "\n" not in err and "supported:" in err
