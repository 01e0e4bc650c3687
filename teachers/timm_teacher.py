"""Teachers that are timm models: a timm hub folder, a timmface checkpoint, or a timmface run directory.

timmface checkpoints (written by the trainer) are ``torch.save`` dicts with ``"format": "timmface"``,
``"version": 1``, ``"step"``, ``"config"`` (``config["model"]`` = backbone, kwargs, embed_dim),
``"model"`` and ``"ema"`` (timm state dicts). As a teacher, a checkpoint gives its EMA weights when
present, else ``model``; a run directory gives its latest ``checkpoints/step_XXXXXXXX.pt``.

Input size. A face run trains at 112x112 whatever timm's registered ``pretrained_cfg["input_size"]`` says
(that describes the ImageNet recipe: ``test_resnet`` exported from a 112 run still reports 160), so the
teacher's size is the ``img_size`` keyword when the run set one, else the patch embedding's fixed size
(ViTs), else 112.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn

from timmface.errors import TeacherError, TimmfaceError
from timmface.hub import timm_weights_name

from .base import Teacher, input_affine
from .detect import read_json
from .files import first_line, load_weights, safe_torch_load

__all__ = ["hub_weights_file", "latest_run_checkpoint", "load_timm_hub", "load_timmface_checkpoint"]

FACE_INPUT = 112
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _input_size(model: nn.Module, kwargs: Mapping[str, Any]) -> tuple[int, int, int]:
    size = kwargs.get("img_size")
    if size is None:
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = FACE_INPUT
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return (3, int(h), int(w))


def _strip_wrappers(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) from keys: the trainer should, but be lenient."""
    out = {}
    for k, v in state.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def hub_weights_file(folder: Path) -> Path:
    """The weights file of a timm hub folder, chosen as timm's local-dir loader chooses it."""
    name = timm_weights_name(p.name for p in folder.iterdir() if p.is_file())
    if name is not None:
        return folder / name
    raise TeacherError(f"{folder}: timm hub folder has config.json but no weights file (model.safetensors)")


def load_timm_hub(folder: Path, arch: str | None = None) -> Teacher:
    """A timm hub folder (``config.json`` + ``model.safetensors``) via ``timm.create_model("local-dir:...")``."""
    import timm

    import students  # noqa: F401  (registers the face variants, so their names resolve)

    config = read_json(folder / "config.json")
    name = config.get("architecture")
    if not isinstance(name, str):
        raise TeacherError(f"{folder / 'config.json'}: no 'architecture' entry: not a timm hub folder")
    _check_arch(folder, arch, name)
    weights = hub_weights_file(folder)
    if not timm.is_model(name):
        raise TeacherError(
            f"{folder}: config.json names '{name}', which is not a timm model in timm {timm.__version__}"
        )
    try:
        # timm reads config.json and loads the weights with safetensors (or torch.load weights_only=True)
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except Exception as e:  # timm raises RuntimeError for key/shape mismatches, others for odd configs
        raise TeacherError(f"{folder}: timm could not build '{name}' from it: {first_line(e)}") from None
    cfg = dict(getattr(model, "pretrained_cfg", None) or config.get("pretrained_cfg") or {})
    mean = tuple(float(m) for m in cfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(float(s) for s in cfg.get("std", (0.5, 0.5, 0.5)))
    scale, shift = input_affine(mean, std)
    if mean == (0.5,) * 3 and std == (0.5,) * 3:
        convention = "RGB, [-1, 1] (timm mean/std 0.5)"
    else:
        convention = f"RGB, (x01 - mean)/std with mean={list(mean)}, std={list(std)} (converted inside)"
    model_args = config.get("model_args") or {}
    # num_classes is the embedding size of a face model; 0 (exported without a head) means the pooled features
    embed_dim = int(config.get("num_classes") or model_args.get("num_classes") or getattr(model, "num_features", 0))
    input_size = _input_size(model, model_args)
    info = {
        "format": "timm_hub",
        "architecture": name,
        "depth": None,
        "parameters": _count(model),
        "input": convention,
        "embed_dim": embed_dim,
        "input_size": input_size,
        "source": str(folder),
        "weights_file": str(weights),
    }
    return Teacher(model, embed_dim=embed_dim, input_size=input_size, info=info, scale=scale, shift=shift)


def _check_arch(source: Path, arch: str | None, found: str) -> None:
    if arch is not None and arch != found:
        raise TeacherError(f"{source}: holds a '{found}' model but arch='{arch}' was asked for")


def latest_run_checkpoint(run_dir: Path) -> Path | None:
    """``run_dir/checkpoints/step_XXXXXXXX.pt`` with the highest step (or ``step_*.pt`` in ``run_dir``)."""
    for folder in (run_dir / "checkpoints", run_dir):
        steps = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _STEP_FILE.match(p.name))]
        if steps:
            return max(steps)[1]
    return None


def load_timmface_checkpoint(
    path: Path, ckpt: Mapping[str, Any], arch: str | None = None, run_dir: Path | None = None
) -> Teacher:
    """A loaded timmface checkpoint dict -> its EMA backbone (or ``model`` when there is no EMA) as a teacher."""
    from students import create_student

    if ckpt.get("version") != 1:
        raise TeacherError(f"{path}: timmface checkpoint version {ckpt.get('version')!r} is not supported (expected 1)")
    model_cfg = (ckpt.get("config") or {}).get("model")
    if not isinstance(model_cfg, Mapping) or not isinstance(model_cfg.get("backbone"), str):
        raise TeacherError(f"{path}: timmface checkpoint has no config['model']['backbone']")
    backbone = model_cfg["backbone"]
    _check_arch(path, arch, backbone)
    kwargs = dict(model_cfg.get("kwargs") or {})
    embed_dim = int(model_cfg.get("embed_dim", 512))
    use_ema = ckpt.get("ema") is not None
    state = ckpt["ema"] if use_ema else ckpt.get("model")
    if not isinstance(state, Mapping):
        raise TeacherError(f"{path}: timmface checkpoint has no 'model' weights")
    try:
        model = create_student(backbone, embed_dim=embed_dim, **kwargs)
    except TimmfaceError as e:
        raise TeacherError(f"{path}: cannot rebuild the backbone: {e}") from None
    load_weights(model, _strip_wrappers(state), str(path), backbone)
    input_size = _input_size(model, kwargs)
    info = {
        "format": "timmface_run" if run_dir is not None else "timmface_checkpoint",
        "architecture": backbone,
        "depth": None,
        "parameters": _count(model),
        "input": "RGB, [-1, 1] (timmface students' input)",
        "embed_dim": embed_dim,
        "input_size": input_size,
        "source": str(run_dir if run_dir is not None else path),
        "weights_file": str(path),
        "weights": "ema" if use_ema else "model",
        "step": ckpt.get("step"),
    }
    return Teacher(model, embed_dim=embed_dim, input_size=input_size, info=info)


def load_timmface_run(run_dir: Path, arch: str | None = None) -> Teacher:
    """A timmface run directory -> its latest checkpoint as a teacher."""
    ckpt_path = latest_run_checkpoint(run_dir)
    if ckpt_path is None:
        raise TeacherError(f"{run_dir}: run directory has no checkpoints/step_XXXXXXXX.pt")
    ckpt = safe_torch_load(ckpt_path)
    if not (isinstance(ckpt, Mapping) and ckpt.get("format") == "timmface"):
        raise TeacherError(f"{ckpt_path}: not a timmface checkpoint (no 'format': 'timmface' entry)")
    return load_timmface_checkpoint(ckpt_path, ckpt, arch, run_dir=run_dir)
