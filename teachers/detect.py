"""Recognise what a file holds (from its bytes, never its name) and which face architecture a state dict is.

Nothing here builds a model or runs code from a file: :func:`sniff_file` reads a few header bytes and
:func:`detect_architecture` looks only at key names and the shape of one weight, so it works on
``{key: torch.Size}`` dicts as well as on loaded tensors.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from timmface.errors import TeacherError

from .adaface import ADAFACE_LAYERS, adaface_block_counts
from .iresnet import IRESNET_LAYERS, iresnet_block_counts

__all__ = ["SUPPORTED_FORMATS", "ArchSpec", "detect_architecture", "format_keys", "parse_arch", "sniff_file"]

SUPPORTED_FORMATS = (
    "insightface iResNet state dict (backbone.pth/model.pt), AdaFace IR Lightning .ckpt or state dict, "
    "timm hub folder (config.json + model.safetensors), timmface checkpoint (.pt) or run directory, "
    "insightface ONNX model (.onnx file or model-pack folder)"
)

# family -> (a key every checkpoint of it has, its block-count table)
_FAMILIES: dict[str, tuple[str, dict[str, tuple[int, int, int, int]]]] = {
    "insightface_iresnet": ("layer1.0.bn1.weight", IRESNET_LAYERS),
    "adaface_ir": ("input_layer.0.weight", ADAFACE_LAYERS),
}
# where each family's embedding size can be read: the final Linear's weight (D x 25088)
_EMBED_KEY = {"insightface_iresnet": "fc.weight", "adaface_ir": "output_layer.3.weight"}
# ONNX ModelProto starts with field 1 (ir_version, varint); the next field is one of these tags
_ONNX_NEXT_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72}


@dataclass(frozen=True)
class ArchSpec:
    """A detected (or requested) face architecture and where its keys sit in the state dict."""

    family: str  # "insightface_iresnet" | "adaface_ir"
    name: str  # "iresnet50", "ir_101", ...
    depth: int  # the number in the name: 50, 101, ...
    layers: tuple[int, ...]  # blocks per stage
    prefix: str  # stripped from keys ("", "model.", "module.")
    embed_dim: int


def format_keys(keys: Iterable[str], limit: int = 3) -> str:
    """``a, b, c and 7 more`` -- key lists stay on one short line."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _known(table: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(layers)}" for name, layers in table.items())


def parse_arch(arch: str) -> tuple[str, str]:
    """``(family, name)`` for a user-given name: ``iresnet50``/``r50``, ``ir_101``/``ir101``/``adaface_ir50``."""
    a = arch.strip().lower().replace("-", "_")
    a = a.removeprefix("adaface_")
    m = re.fullmatch(r"(?:iresnet|r)(\d+)", a)
    if m and f"iresnet{m.group(1)}" in IRESNET_LAYERS:
        return "insightface_iresnet", f"iresnet{m.group(1)}"
    m = re.fullmatch(r"ir_?(\d+)", a)
    if m:
        depth = "101" if m.group(1) == "100" else m.group(1)  # AdaFace builds ir_101 with num_layers=100
        if f"ir_{depth}" in ADAFACE_LAYERS:
            return "adaface_ir", f"ir_{depth}"
    raise TeacherError(
        f"unknown teacher architecture '{arch}' (known: {', '.join([*IRESNET_LAYERS, *ADAFACE_LAYERS])})"
    )


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _find_prefix(keys: Iterable[str], marker: str) -> str | None:
    prefixes = [k[: -len(marker)] for k in keys if k == marker or k.endswith("." + marker)]
    return min(prefixes, key=len) if prefixes else None


def detect_architecture(state: Mapping[str, Any], arch: str | None = None, source: str = "") -> ArchSpec | None:
    """The face architecture a state dict holds, from its keys; ``None`` when no face family matches.

    ``state`` maps key -> tensor (or shape). Keys may sit under a prefix (``model.`` in AdaFace's
    Lightning ``state_dict``, ``module.`` from DDP); the family's marker key tells which. ``arch``
    (e.g. ``"iresnet100"``) replaces the depth detection. Raises :class:`TeacherError` when the keys
    are a known family but the blocks per stage match no known depth.
    """
    where = f"{source}: " if source else ""
    state = {k: v for k, v in state.items() if isinstance(k, str)}  # a pickle may hold any key type
    if arch is not None:
        family, name = parse_arch(arch)
        prefix = _find_prefix(state, _FAMILIES[family][0])
        if prefix is None:
            other = [
                f for f, (marker, _) in _FAMILIES.items() if f != family and _find_prefix(state, marker) is not None
            ]
            if other:
                raise TeacherError(f"{where}arch='{arch}' is an {family} architecture but the keys are {other[0]}'s")
            prefix = ""  # let the key comparison name what is missing
    else:
        family = name = ""
        prefix = None
        for fam, (marker, _) in _FAMILIES.items():
            prefix = _find_prefix(state, marker)
            if prefix is not None:
                family = fam
                break
        if prefix is None:
            return None
    keys = [k[len(prefix) :] for k in state if k.startswith(prefix)]
    table = _FAMILIES[family][1]
    if not name:
        counts = iresnet_block_counts(keys) if family == "insightface_iresnet" else adaface_block_counts(keys)
        matches = [n for n, layers in table.items() if layers == counts]
        if not matches:
            raise TeacherError(
                f"{where}{family} blocks per stage {list(counts)} match no known depth (known: {_known(table)})"
            )
        name = matches[0]
    embed_key = prefix + _EMBED_KEY[family]
    embed_dim = _shape(state[embed_key])[0] if embed_key in state and len(_shape(state[embed_key])) == 2 else 512
    depth = int(re.sub(r"\D", "", name))
    return ArchSpec(family, name, depth, table[name], prefix, int(embed_dim))


def sniff_file(path: Path) -> str:
    """What a file is, from its first bytes: ``torch-zip``, ``pickle``, ``safetensors``, ``onnx`` or ``unknown``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":  # torch.save's zip container (also any zip: torch.load then fails clearly)
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # pickle PROTO opcode: legacy torch.save
        return "pickle"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + n <= size:  # safetensors: u64 header length, then a JSON header
            return "safetensors"
    if len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 32 and head[2] in _ONNX_NEXT_TAGS:
        return "onnx"
    return "unknown"


def describe_bytes(path: Path) -> str:
    """A short description of an unrecognised file, for one-line errors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
    return f"{size} bytes starting {head!r}" if size else "an empty file"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or :class:`TeacherError`."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TeacherError(f"{path}: cannot read JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise TeacherError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def is_tensor_dict(obj: Any) -> bool:
    """True for a non-empty mapping of string keys to tensors (a state dict)."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )
