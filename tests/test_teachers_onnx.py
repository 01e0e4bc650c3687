"""ONNX teachers (insightface model packs) through onnxruntime, from small models the tests export.

The input convention (raw 0..255 pixels for older MXNet conversions, else [-1, 1]) must not depend on whether the
``onnx`` package is installed: with onnxruntime alone, raw-pixel models used to get [-1, 1] input (wrong
embeddings, no error), so the graph facts are read from the protobuf itself and checked here with ``onnx`` hidden.
"""

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


def mxnet_style_model(path: Path, sub_name: str = "_minusscalar0", mul_name: str = "_mulscalar0") -> np.ndarray:
    """A raw-pixel graph (normalises inside, as older insightface packs do); returns its weight."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((3 * 112 * 112, 16)).astype(np.float32) * 0.01
    nodes = [
        helper.make_node("Sub", ["data", "mean"], ["x0"], name=sub_name),
        helper.make_node("Mul", ["x0", "scale"], ["x1"], name=mul_name),
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
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return weight


@pytest.mark.parametrize("onnx_installed", [True, False])
def test_raw_pixel_graph_gets_raw_pixels_with_or_without_onnx(onnx_installed: bool, tmp_path: Path, monkeypatch):
    path = tmp_path / "w600k_mxnet.onnx"
    weight = mxnet_style_model(path)
    if not onnx_installed:
        monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    t = teachers.load_teacher(path)
    x = rgb_batch(2)
    pixels = x * 127.5 + 127.5
    expected = ((pixels - 127.5) * 0.0078125).flatten(1) @ torch.from_numpy(weight)
    torch.testing.assert_close(t(x), expected, rtol=1e-4, atol=1e-4)
    assert t.teacher_info["input"].startswith("RGB, 0..255")
    assert t.teacher_info["parameters"] == weight.size + 2


def test_graph_facts_equal_what_onnx_reads(tmp_path: Path, monkeypatch):
    """The first node names and the parameter count, read without onnx, equal onnx's own reading of an exported
    torch model and of a hand-built graph."""
    from teachers.onnx_teacher import read_graph_facts

    torch.manual_seed(0)
    files = [export(TinyRecognition().eval(), tmp_path / "tiny.onnx"), tmp_path / "mx.onnx"]
    mxnet_style_model(files[1], sub_name="Sub_0", mul_name="Mul_1")
    expected = []
    for f in files:
        m = onnx.load(str(f))
        expected.append(([n.name for n in m.graph.node[:8]], sum(int(np.prod(t.dims)) for t in m.graph.initializer)))
    monkeypatch.setitem(sys.modules, "onnx", None)
    for f, (names, params) in zip(files, expected, strict=True):
        facts = read_graph_facts(f)
        assert (facts.first_nodes, facts.parameters) == (names, params)
    assert read_graph_facts(files[1]).raw_pixels and not read_graph_facts(files[0]).raw_pixels


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2); numbers and lengths below 128 fit one byte."""
    assert number < 16 and len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_graph_facts_read_packed_dims(tmp_path: Path):
    """onnx writes ``dims`` unpacked (proto2); a packed encoding is valid protobuf too and must count the same."""
    from teachers.onnx_teacher import read_graph_facts

    node = _field(3, b"_minus0")  # NodeProto.name
    mul = _field(3, b"_mul0")
    tensor = _field(1, bytes([3, 4, 5])) + _field(8, b"w")  # TensorProto.dims packed [3, 4, 5], .name "w"
    graph = _field(1, node) + _field(1, mul) + _field(5, tensor)
    path = tmp_path / "packed.onnx"
    path.write_bytes(bytes([0x08, 0x07]) + _field(7, graph))  # ModelProto.ir_version 7 (a varint), .graph
    facts = read_graph_facts(path)
    assert (facts.first_nodes, facts.parameters, facts.raw_pixels) == (["_minus0", "_mul0"], 60, True)


def test_graph_facts_of_a_file_that_is_not_onnx_is_one_line(tmp_path: Path):
    from teachers.onnx_teacher import read_graph_facts

    for name, data in (("empty.onnx", b""), ("cut.onnx", bytes([0x3A, 0x7F, 0x0A]))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TeacherError) as e:
            read_graph_facts(tmp_path / name)
        assert name in assert_one_line(e)


def test_missing_onnxruntime(tmp_path: Path, tiny: TinyRecognition, monkeypatch: pytest.MonkeyPatch) -> None:
    path = export(tiny, tmp_path / "glintr100.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher(path)
    assert "pip install timmface[onnx]" in assert_one_line(e)
