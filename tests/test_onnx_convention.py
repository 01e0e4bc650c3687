"""An ONNX teacher's input convention does not depend on whether the ``onnx`` package is installed.

insightface's ``ArcFaceONNX`` reads the graph's first 8 node names to tell raw-pixel MXNet conversions (``Sub`` /
``_minus*`` and ``Mul`` / ``_mul*`` nodes) from graphs that take [-1, 1]. With only onnxruntime installed, that
detection used to be skipped and raw-pixel models were fed [-1, 1] input: wrong embeddings, no error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import teachers
from tests.test_teachers import rgb_batch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


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
    torch model (unpacked and packed dims, many initializers, raw_data and float_data)."""
    from teachers.onnx_teacher import read_graph_facts
    from tests.test_teachers_onnx import TinyRecognition, export

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
