"""insightface ONNX recognition models (``buffalo_l/w600k_r50.onnx``, ``antelopev2/glintr100.onnx``, ...).

Run through onnxruntime (the optional extra ``pip install timmface[onnx]``) behind the same module
interface as every other teacher. Input convention, as insightface's ``ArcFaceONNX`` decides it
(``python-package/insightface/model_zoo/arcface_onnx.py``): the network takes RGB NCHW float32 in
``(x - 127.5) / 127.5`` -- our [-1, 1] batch as is -- unless one of its first 8 nodes is named
``Sub``/``_minus*`` and one ``Mul``/``_mul*`` (older MXNet conversions normalise inside the graph), in
which case it takes raw 0..255 pixels. The batch axis may be fixed (often to 1): then the batch is fed
in chunks of that size, the last one zero-padded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from timmface.errors import TeacherError

from .base import Teacher
from .files import first_line

__all__ = ["OnnxNet", "load_onnx_teacher", "onnx_recognition_model"]

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


def _graph_facts(path: Path) -> tuple[bool, int | None]:
    """``(takes_raw_pixels, parameter count)`` read with ``onnx`` (``(False, None)`` if it is not installed)."""
    try:
        import onnx
    except ImportError:
        return False, None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False, None
    names = [node.name for node in model.graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    params = sum(math.prod(t.dims) for t in model.graph.initializer)
    return has_sub and has_mul, params


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
    raw, params = _graph_facts(path)
    if arch is not None and arch not in (path.stem, path.name):
        raise TeacherError(f"{path}: holds ONNX model '{path.stem}' but arch='{arch}' was asked for")
    info = {
        "format": "onnx",
        "architecture": path.stem,
        "depth": None,
        "parameters": params,
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
