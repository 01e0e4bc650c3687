"""``load_teacher``: any supported teacher file or folder -> a frozen :class:`Teacher`; and its fingerprint.

The format comes from the contents (zip/pickle/safetensors/ONNX header bytes, then the keys inside),
never from the file name. Loading never runs code from the file: ``torch.load(weights_only=True)``,
safetensors, or an onnxruntime session.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from timmface.errors import TeacherError
from timmface.hub import is_hub_spec, resolve_model

from .adaface import AdaFaceIR
from .base import Teacher
from .detect import SUPPORTED_FORMATS, ArchSpec, describe_bytes, detect_architecture, format_keys, sniff_file
from .files import load_weights, read_safetensors, safe_torch_load
from .iresnet import IResNet
from .onnx_teacher import load_onnx_teacher, onnx_recognition_model
from .timm_teacher import (
    hub_weights_file,
    latest_run_checkpoint,
    load_timm_hub,
    load_timmface_checkpoint,
    load_timmface_run,
)

__all__ = ["build_face_teacher", "load_teacher", "teacher_files", "teacher_fingerprint"]

_INPUT = {
    "insightface_iresnet": "RGB, (x/255 - 0.5)/0.5 = [-1, 1]",
    "adaface_ir": "BGR, (x/255 - 0.5)/0.5 (channels flipped inside)",
}


def _unrecognised(path: Path, found: str) -> TeacherError:
    return TeacherError(f"{path}: not a recognised teacher: found {found}; supported: {SUPPORTED_FORMATS}")


def load_teacher(checkpoint_path: str | os.PathLike[str], arch: str | None = None) -> Teacher:
    """Load a frozen face teacher: RGB ``N x 3 x 112 x 112`` in [-1, 1] -> unnormalised ``N x D``.

    ``checkpoint_path`` is an insightface iResNet state dict, an AdaFace Lightning ``.ckpt`` (or its
    state dict), a safetensors state dict of either, a timm hub folder, a timmface checkpoint or run
    directory, or an insightface ONNX file / model-pack folder; or any of these on the Hugging Face Hub,
    ``hf-hub:OWNER/REPO[@REVISION][/FILE]`` (:mod:`timmface.hub`: fetched into the hub cache, then read as
    the same local file or folder; ``teacher_info["source"]`` is the commit-pinned spec and
    ``teacher_info["hub"]`` the repository, revision, commit and files). ``arch`` (e.g. ``"iresnet100"``,
    ``"ir_101"``) overrides the depth detection of state dicts; for the other formats it must equal the
    architecture the file names. The result is in eval mode with no trainable parameter and carries
    ``embed_dim``, ``input_size`` and ``teacher_info``. Every problem is one :class:`TeacherError` line.
    """
    if is_hub_spec(checkpoint_path):
        return _load_hub(str(checkpoint_path), arch)
    path = Path(checkpoint_path)
    if not path.exists():
        raise TeacherError(f"{path}: no such file or directory")
    if path.is_dir():
        return _load_directory(path, arch)
    kind = sniff_file(path)
    if kind == "onnx":
        return load_onnx_teacher(path, arch)
    if kind == "safetensors":
        return _from_state_dict(path, read_safetensors(path), "safetensors state dict", arch)
    if kind in ("torch-zip", "pickle"):
        return _from_torch_object(path, safe_torch_load(path), arch)
    raise _unrecognised(path, describe_bytes(path))


def _load_hub(spec: str, arch: str | None) -> Teacher:
    r = resolve_model(spec)
    try:
        teacher = load_teacher(r.local, arch)
    except TeacherError as e:  # name the hub file, not its place in the cache
        raise TeacherError(r.rename(str(e))) from None
    teacher.teacher_info.update(source=r.pinned, hub=r.record())
    return teacher


def _load_directory(path: Path, arch: str | None) -> Teacher:
    if (path / "config.json").is_file():
        return load_timm_hub(path, arch)
    if latest_run_checkpoint(path) is not None:
        return load_timmface_run(path, arch)
    if any(path.glob("*.onnx")):
        return load_onnx_teacher(path, arch)
    names = sorted(p.name for p in path.iterdir())
    found = f"a folder holding {format_keys(names)}" if names else "an empty folder"
    raise _unrecognised(path, found)


def _from_torch_object(path: Path, obj: Any, arch: str | None) -> Teacher:
    if isinstance(obj, Mapping) and obj.get("format") == "timmface":
        return load_timmface_checkpoint(path, obj, arch)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        # a Lightning .ckpt (AdaFace), or a bare {"state_dict": ...}
        container = "Lightning checkpoint" if "global_step" in obj or "epoch" in obj else "{'state_dict': ...} dict"
        return _from_state_dict(path, obj["state_dict"], container, arch)
    if isinstance(obj, Mapping) and obj:
        return _from_state_dict(path, obj, "state dict", arch)
    raise _unrecognised(path, f"a PyTorch file holding {type(obj).__name__}")


def _from_state_dict(path: Path, state: Mapping[str, Any], container: str, arch: str | None) -> Teacher:
    spec = detect_architecture(state, arch, source=str(path))
    if spec is None:
        keys = [str(k) for k in state]
        raise _unrecognised(path, f"a {container} with {len(keys)} entries ({format_keys(keys)}) of no known layout")
    weights = {k[len(spec.prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(spec.prefix)}
    return build_face_teacher(spec, weights, source=str(path), container=container)


def build_face_teacher(
    spec: ArchSpec, weights: Mapping[str, Any], source: str, container: str = "state dict"
) -> Teacher:
    """Build the iResNet / AdaFace IR of ``spec``, load ``weights`` (keys without prefix) and wrap it."""
    with torch.device("meta"):  # every tensor comes from the file: skip random init and a second copy
        net = (
            IResNet(spec.layers, spec.embed_dim)
            if spec.family == "insightface_iresnet"
            else AdaFaceIR(spec.layers, spec.embed_dim)
        )
    load_weights(net, weights, source, spec.name, assign=True)
    info = {
        "format": spec.family,
        "architecture": spec.name,
        "depth": spec.depth,
        "parameters": sum(p.numel() for p in net.parameters()),
        "input": _INPUT[spec.family],
        "embed_dim": spec.embed_dim,
        "input_size": (3, 112, 112),
        "source": source,
        "container": container + (f", keys under '{spec.prefix}'" if spec.prefix else ""),
    }
    return Teacher(net, embed_dim=spec.embed_dim, input_size=(3, 112, 112), info=info, bgr=spec.family == "adaface_ir")


def teacher_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files whose bytes define a teacher: the file itself, a run's latest checkpoint, a hub folder's
    ``config.json`` + weights, or a model pack's recognition model; for a Hub spec, those of its cached copy."""
    if is_hub_spec(path):
        return teacher_files(resolve_model(str(path)).local)
    p = Path(path)
    if not p.exists():
        raise TeacherError(f"{p}: no such file or directory")
    if p.is_file():
        return [p]
    if (p / "config.json").is_file():
        return [p / "config.json", hub_weights_file(p)]
    ckpt = latest_run_checkpoint(p)
    if ckpt is not None:
        return [ckpt]
    if any(p.glob("*.onnx")):
        return [onnx_recognition_model(p)]
    raise _unrecognised(p, "a folder with no teacher files")


def teacher_fingerprint(path: str | os.PathLike[str]) -> str:
    """A stable 16-hex-digit digest of the teacher's weights: SHA-256 over the bytes of :func:`teacher_files`.

    It depends on contents only (not names, paths or times), so an embedding cache written with one copy
    of a teacher stays valid for another copy (a Hub commit and a local download of it agree); a run
    directory is identified by its latest checkpoint.
    """
    digest = hashlib.sha256()
    for f in teacher_files(path):
        file_hash = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                file_hash.update(block)
        digest.update(file_hash.digest())
    return digest.hexdigest()[:16]
