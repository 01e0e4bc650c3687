"""ONNX teachers (insightface model packs) through onnxruntime, from small models the tests export."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import teachers
from tests.test_teachers import assert_one_line, rgb_batch
from timmface.errors import TeacherError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class TinyRecognition(nn.Module):
    """N x 3 x 112 x 112 -> N x 512, with a BatchNorm (random running stats) and a PReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.PReLU(8)
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(8 * 7 * 7, 512)
        self.bn.running_mean.normal_(0, 0.3)
        self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


def export(model: nn.Module, path: Path, size: int = 112, batch: int | None = None) -> Path:
    """Export with a dynamic batch axis (``batch=None``) or a fixed one."""
    dynamic = {"input.1": {0: "None"}, "embedding": {0: "None"}} if batch is None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.zeros(batch or 1, 3, size, size),),
            str(path),
            input_names=["input.1"],
            output_names=["embedding"],
            dynamic_axes=dynamic,
            dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def tiny() -> TinyRecognition:
    torch.manual_seed(0)
    return TinyRecognition().eval()


@pytest.mark.parametrize("batch", [None, 1, 2])
def test_onnx_matches_torch(tmp_path: Path, tiny: TinyRecognition, batch: int | None) -> None:
    path = export(tiny, tmp_path / "w600k_r50.onnx", batch=batch)
    t = teachers.load_teacher(path)
    x = rgb_batch(3)  # through a fixed-batch graph: fed in chunks of its batch, the last one padded
    out = t(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 512) and out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, tiny(x), rtol=1e-4, atol=1e-4)  # insightface ONNX takes our [-1, 1] RGB as is
    info = t.teacher_info
    assert (info["format"], info["architecture"], info["embed_dim"]) == ("onnx", "w600k_r50", 512)
    assert info["batch"] == (batch or "dynamic")
    # counted from the graph's initializers: the exporter folds the BatchNorm into the conv
    assert abs(info["parameters"] - sum(p.numel() for p in tiny.parameters())) <= 32
    assert t.input_size == (3, 112, 112) and not t.training


def test_onnx_wrapper_runs(tmp_path: Path, tiny: TinyRecognition) -> None:
    t = teachers.TeacherWrapper(teachers.load_teacher(export(tiny, tmp_path / "m.onnx")), dtype="bfloat16")
    x = rgb_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(t(x), tiny(x), rtol=1e-4, atol=1e-4)  # onnxruntime stays float32


def test_model_pack_folder_picks_recognition_model(tmp_path: Path, tiny: TinyRecognition) -> None:
    pack = tmp_path / "buffalo_l"
    pack.mkdir()
    export(tiny, pack / "w600k_r50.onnx")
    export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), pack / "genderage.onnx", size=96)  # a 96x96 attribute model
    t = teachers.load_teacher(pack)
    assert t.teacher_info["architecture"] == "w600k_r50"
    assert teachers.teacher_files(pack) == [pack / "w600k_r50.onnx"]
    assert teachers.teacher_fingerprint(pack) == teachers.teacher_fingerprint(pack / "w600k_r50.onnx")


def test_mxnet_style_graph_takes_raw_pixels(tmp_path: Path) -> None:
    """Older packs normalise inside the graph (nodes _minusscalar0/_mulscalar0): they get 0..255 pixels."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3 * 112 * 112, 16)).astype(np.float32) * 0.01
    nodes = [
        helper.make_node("Sub", ["data", "mean"], ["x0"], name="_minusscalar0"),
        helper.make_node("Mul", ["x0", "scale"], ["x1"], name="_mulscalar0"),
        helper.make_node("Flatten", ["x1"], ["x2"], name="flatten0", axis=1),
        helper.make_node("MatMul", ["x2", "w"], ["fc1"], name="fc1"),
    ]
    graph = helper.make_graph(
        nodes,
        "mxnet_converted",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 16])],
        initializer=[
            numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
            numpy_helper.from_array(np.array(0.0078125, np.float32), "scale"),
            numpy_helper.from_array(weight, "w"),
        ],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    t = teachers.load_teacher(path)
    x = rgb_batch(2)
    pixels = x * 127.5 + 127.5
    expected = ((pixels - 127.5) * 0.0078125).flatten(1) @ torch.from_numpy(weight)
    torch.testing.assert_close(t(x), expected, rtol=1e-4, atol=1e-4)
    assert t.teacher_info["input"].startswith("RGB, 0..255") and t.embed_dim == 16


def test_missing_onnxruntime(tmp_path: Path, tiny: TinyRecognition, monkeypatch: pytest.MonkeyPatch) -> None:
    path = export(tiny, tmp_path / "glintr100.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher(path)
    assert "pip install timmface[onnx]" in assert_one_line(e)
