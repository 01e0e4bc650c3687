"""insightface ONNX recognition models (``buffalo_l/w600k_r50.onnx``, ``antelopev2/glintr100.onnx``, ...).

Run through onnxruntime (the optional extra ``pip install timmface[onnx]``) behind the same module
interface as every other teacher. Input convention, as insightface's ``ArcFaceONNX`` decides it
(``python-package/insightface/model_zoo/arcface_onnx.py``): the network takes RGB NCHW float32 in
``(x - 127.5) / 127.5`` -- our [-1, 1] batch as is -- unless one of its first 8 nodes is named
``Sub``/``_minus*`` and one ``Mul``/``_mul*`` (older MXNet conversions normalise inside the graph), in
which case it takes raw 0..255 pixels. The batch axis may be fixed (often to 1): then the batch is fed
in chunks of that size, the last one zero-padded.

The node names (and the parameter count) are read from the file's protobuf encoding by
:func:`read_graph_facts`, not through the ``onnx`` package: onnxruntime alone does not expose node names,
and the convention must not depend on which of the two packages happens to be installed (with onnxruntime
only, raw-pixel models used to get [-1, 1] input: wrong embeddings and no error).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from timmface.errors import TeacherError

from .base import Teacher
from .files import first_line

__all__ = ["GraphFacts", "OnnxNet", "load_onnx_teacher", "onnx_recognition_model", "read_graph_facts"]

_INSTALL = "pip install timmface[onnx]"


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise TeacherError(f"ONNX teachers need onnxruntime, which is not installed: {_INSTALL}") from None
    return onnxruntime


def _session(path: Path) -> Any:
    ort = _onnxruntime()
    available = ort.get_available_providers()
    # CUDA when this onnxruntime build has it; never TensorRT, whose engine builds take minutes
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise TeacherError(f"{path}: onnxruntime cannot load it: {first_line(e)}") from None


# ---------------------------------------------------------------------------------------------------------------
# The few facts needed from the graph, read from its protobuf wire format (onnx.proto3 field numbers:
# ModelProto.graph = 7; GraphProto.node = 1, .initializer = 5; NodeProto.name = 3; TensorProto.dims = 1)
# ---------------------------------------------------------------------------------------------------------------

_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INITIALIZER, _NODE_NAME, _TENSOR_DIMS = 7, 1, 5, 3, 1
_FIRST_NODES = 8  # insightface's ArcFaceONNX looks at graph.node[:8]


@dataclass(frozen=True)
class GraphFacts:
    first_nodes: list[str]
    """Names of the graph's first 8 nodes, in order."""
    parameters: int
    """Elements of all initializers (the weights; BatchNorms are usually folded into convolutions)."""

    @property
    def raw_pixels(self) -> bool:
        """insightface's rule: a ``Sub``/``_minus*`` and a ``Mul``/``_mul*`` node among the first 8 mean the graph
        normalises raw 0..255 pixels itself (older MXNet conversions)."""
        has_sub = any(n.startswith(("Sub", "_minus")) for n in self.first_nodes)
        has_mul = any(n.startswith(("Mul", "_mul")) for n in self.first_nodes)
        return has_sub and has_mul


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError(f"bad varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of one message: the integer of a varint, the ``(start, end)`` span of a
    length-delimited field (sub-message, bytes, packed numbers), None for fixed-size numbers."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        value: Any = None
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            pos += 4
        else:  # 3/4: groups, which onnx.proto does not use
            raise ValueError(f"wire type {wire} at byte {pos}")
        if pos > end:
            raise ValueError(f"field {field} runs past the end of its message (byte {end})")
        yield field, wire, value


def _dims(buf: Any, start: int, end: int) -> list[int]:
    dims: list[int] = []
    for field, wire, value in _fields(buf, start, end):
        if field != _TENSOR_DIMS:
            continue
        if wire == 0:
            dims.append(value)
        elif wire == 2:  # packed
            pos, stop = value
            while pos < stop:
                d, pos = _varint(buf, pos, stop)
                dims.append(d)
    return dims


def read_graph_facts(path: str | Path) -> GraphFacts:
    """The first node names and the parameter count of an ONNX file, without the ``onnx`` package (memory-mapped:
    weights are skipped, not read). TeacherError when the file is not a readable ONNX model."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            names: list[str] = []
            params = 0
            graph = next((v for fld, w, v in _fields(buf, 0, len(buf)) if fld == _MODEL_GRAPH and w == 2), None)
            if graph is None:
                raise ValueError("no graph")
            for field, wire, value in _fields(buf, *graph):
                if wire != 2:
                    continue
                if field == _GRAPH_NODE and len(names) < _FIRST_NODES:
                    name = next((v for fld, w, v in _fields(buf, *value) if fld == _NODE_NAME and w == 2), None)
                    names.append(bytes(buf[name[0] : name[1]]).decode("utf-8", "replace") if name else "")
                elif field == _GRAPH_INITIALIZER:
                    count = 1
                    for d in _dims(buf, *value):
                        count *= d
                    params += count
    except (OSError, ValueError) as e:  # mmap of an empty file is a ValueError too
        raise TeacherError(f"{path}: cannot read the ONNX graph to tell its input convention ({e})") from None
    return GraphFacts(names, params)


def _dim(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


class OnnxNet(nn.Module):
    """An onnxruntime session as a module: ``N x 3 x H x W`` float -> ``N x D`` float32 on the input's device."""

    def __init__(self, path: Path, session: Any) -> None:
        super().__init__()
        self.path = str(path)
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.output_name = session.get_outputs()[0].name
        self.batch = _dim(self.input_shape[0]) if self.input_shape else None  # None: dynamic batch axis

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def forward(self, x: Tensor) -> Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.batch is None:
            out = self._run(arr)
        else:
            outs = []
            for i in range(0, len(arr), self.batch):
                chunk = arr[i : i + self.batch]
                n = len(chunk)
                if n < self.batch:
                    chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), np.float32)])
                outs.append(self._run(chunk)[:n])
            out = np.concatenate(outs)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(len(arr), -1).to(x.device)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, input={self.input_shape}"


def onnx_recognition_model(folder: Path) -> Path:
    """The recognition model of an insightface model pack folder (square input of at least 112, one output).

    Packs also hold detection, landmark and gender/age models; insightface's model router tells them apart
    by input shape the same way.
    """
    files = sorted(folder.glob("*.onnx"))
    if len(files) == 1:
        return files[0]
    found = []
    for f in files:
        session = _session(f)
        shape = session.get_inputs()[0].shape
        h, w = (_dim(shape[2]), _dim(shape[3])) if len(shape) == 4 else (None, None)
        if h and h == w and h >= 112 and h % 16 == 0 and len(session.get_outputs()) == 1:
            found.append(f)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(f.name for f in found)})"
        raise TeacherError(f"{folder}: {what} ONNX recognition models among {len(files)} .onnx files; pass the file")
    return found[0]


def load_onnx_teacher(path: Path, arch: str | None = None) -> Teacher:
    """An ONNX recognition model (file, or model-pack folder) as a teacher."""
    source = path
    if path.is_dir():
        path = onnx_recognition_model(path)
    net = OnnxNet(path, _session(path))
    shape = net.input_shape
    if len(shape) != 4 or (_dim(shape[1]) not in (None, 3)):
        raise TeacherError(f"{path}: ONNX input '{net.input_name}' has shape {shape}, expected N x 3 x H x W")
    h, w = _dim(shape[2]) or 112, _dim(shape[3]) or 112
    out_shape = net.session.get_outputs()[0].shape
    embed_dim = _dim(out_shape[-1]) if out_shape else None
    if embed_dim is None:  # a dynamic output axis: ask the model
        embed_dim = int(net(torch.zeros(net.batch or 1, 3, h, w)).shape[1])
    facts = read_graph_facts(path)
    raw = facts.raw_pixels
    if arch is not None and arch not in (path.stem, path.name):
        raise TeacherError(f"{path}: holds ONNX model '{path.stem}' but arch='{arch}' was asked for")
    info = {
        "format": "onnx",
        "architecture": path.stem,
        "depth": None,
        "parameters": facts.parameters,
        "input": "RGB, 0..255 (normalised inside the graph)" if raw else "RGB, (x - 127.5)/127.5 = [-1, 1]",
        "embed_dim": embed_dim,
        "input_size": (3, h, w),
        "source": str(source),
        "weights_file": str(path),
        "batch": net.batch or "dynamic",
    }
    # raw pixels: x255 = 127.5 * x + 127.5 for our [-1, 1] x
    scale, shift = ([127.5] * 3, [127.5] * 3) if raw else (None, None)
    return Teacher(net, embed_dim=embed_dim, input_size=(3, h, w), info=info, scale=scale, shift=shift)
