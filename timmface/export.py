"""From a run to what people use: the backbone alone, as a timm hub folder (+ ONNX), optionally pushed to the Hub.

A timmface checkpoint holds the backbone (``model``), its EMA (``ema``, when active), class centres, distillation
projections, optimiser state and the config. The shipped artifact is only the backbone -- EMA weights when present --
as ``timm.create_model`` rebuilds it: ``config.json`` (timm's own ``save_for_hf`` layout: ``architecture``,
``num_classes`` = embedding size, ``model_args`` = the run's ``model.kwargs``, ``pretrained_cfg`` with the face input
convention: 112x112 RGB, mean = std = 0.5) and ``model.safetensors``. Class centres and projections are dropped.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from timmface.checkpoint import clean_state_dict, list_checkpoints, load_checkpoint
from timmface.errors import CheckpointError, ConfigError, TimmfaceError
from timmface.fileio import atomic_path, output_mode, replaceable_folder

__all__ = [
    "FACE_INPUT_SIZE",
    "ExportResult",
    "OnnxCheck",
    "RunModel",
    "export_onnx",
    "export_run",
    "find_checkpoint",
    "load_run_model",
    "model_card",
    "push_folder",
    "summarise_metrics",
]

FACE_INPUT_SIZE = (3, 112, 112)
# the face input convention: RGB, (x / 255 - 0.5) / 0.5, no crop (face crops are already aligned)
FACE_DATA_CONFIG: dict[str, Any] = {
    "input_size": FACE_INPUT_SIZE,
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}
# pretrained_cfg fields that describe timm's ImageNet weights, not ours
_SOURCE_FIELDS = ("tag", "license", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "state_dict",
                  "test_input_size", "test_crop_pct", "test_pool_size", "label_names", "label_descriptions", "notes",
                  "paper_ids", "paper_name", "origin_url")  # fmt: skip
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
ONNX_EXTRA = "pip install 'timmface[onnx]'"


# --------------------------------------------------------------------------------------------------
# Loading a run's backbone
# --------------------------------------------------------------------------------------------------


@dataclass
class RunModel:
    """A run's backbone, rebuilt with ``students.create_student`` and loaded from one checkpoint."""

    backbone: nn.Module
    """Eval mode, on the CPU: uint8-free float RGB ``N x 3 x 112 x 112`` in [-1, 1] -> ``N x D``."""
    checkpoint: Path
    run_dir: Path | None
    config: dict[str, Any]
    step: int
    weights: str
    """``"ema"`` or ``"model"``."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last evaluation stored in the checkpoint."""

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.config.get("model") or {})

    def info(self) -> dict[str, Any]:
        """A ``teacher_info``-like description (format, architecture, parameters, weights, step, ...)."""
        m = self.model_config
        return {
            "format": "timmface_run" if self.run_dir is not None else "timmface_checkpoint",
            "architecture": m.get("backbone"),
            "kwargs": m.get("kwargs") or {},
            "parameters": sum(p.numel() for p in self.backbone.parameters()),
            "input": "RGB, [-1, 1] (timmface students' input)",
            "embed_dim": int(m.get("embed_dim", 0)),
            "source": str(self.run_dir or self.checkpoint),
            "weights_file": str(self.checkpoint),
            "weights": self.weights,
            "step": self.step,
        }


def find_checkpoint(source: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(checkpoint, run directory or None)`` for a run directory (its newest checkpoint) or a checkpoint file."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return path, run_dir
    if path.name == "checkpoints" and not (path / "checkpoints").is_dir():
        path = path.parent
    found = list_checkpoints(path)
    if not found:
        # checkpoints copied out of their run, as teachers accept them
        flat = sorted((int(m.group(1)), p) for p in path.glob("step_*.pt") if (m := _STEP_FILE.match(p.name)))
        if flat:
            return flat[-1][1], None
        raise CheckpointError(f"{path}: no checkpoint in this run directory (expected checkpoints/step_XXXXXXXX.pt)")
    return found[-1][1], path


def is_timmface_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory with checkpoints or a timmface checkpoint file (read weights-only)."""
    p = Path(path)
    if p.is_dir():
        return bool(list_checkpoints(p)) or (p.name == "checkpoints" and bool(list_checkpoints(p.parent)))
    if not p.is_file():
        return False
    try:  # mmap: only the small "format" entry is touched, not the weights
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") == "timmface"


def load_run_model(source: str | os.PathLike, ema: bool = True) -> RunModel:
    """Rebuild a run's backbone from its newest checkpoint (or the checkpoint file given).

    ``ema`` takes the EMA weights when the checkpoint holds them (the weights the trainer evaluates), else the live
    ones. CheckpointError (one line) when there is no checkpoint or the weights do not fit the configured backbone.
    """
    from students import create_student

    ckpt_path, run_dir = find_checkpoint(source)
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt.get("config") or {}
    m = config.get("model") or {}
    if not isinstance(m.get("backbone"), str):
        raise CheckpointError(f"{ckpt_path}: checkpoint has no config['model']['backbone']")
    use_ema = ema and ckpt.get("ema") is not None
    state = ckpt["ema"] if use_ema else ckpt.get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt_path}: checkpoint has no backbone weights ('model')")
    try:
        backbone = create_student(m["backbone"], embed_dim=int(m.get("embed_dim", 512)), **dict(m.get("kwargs") or {}))
    except TimmfaceError as e:
        raise CheckpointError(f"{ckpt_path}: cannot rebuild the backbone: {e}") from None
    try:
        backbone.load_state_dict(clean_state_dict(state), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(f"{ckpt_path}: weights do not fit {m['backbone']} ({first})") from None
    return RunModel(
        backbone=backbone.eval(),
        checkpoint=ckpt_path,
        run_dir=run_dir,
        config=config,
        step=int(ckpt.get("step", 0)),
        weights="ema" if use_ema else "model",
        metrics=dict(ckpt.get("metrics") or {}),
    )


# --------------------------------------------------------------------------------------------------
# Metrics for the model card
# --------------------------------------------------------------------------------------------------


def summarise_metrics(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``acc/<set>``: best and last value with their steps (and ``acc_std/<set>`` at those steps)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        step = r.get("step")
        for key, value in r.items():
            if not key.startswith("acc/") or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name = key[4:]
            std = r.get(f"acc_std/{name}")
            s = out.setdefault(name, {"best": -math.inf})
            if value > s["best"]:  # the first step that reached the best value
                s.update(best=float(value), best_step=step, best_std=std)
            s.update(last=float(value), last_step=step, last_std=std)
    return out


def _protocol_line(config: dict[str, Any]) -> str:
    flip = bool(config.get("eval_flip", True))
    return "insightface 10-fold pair verification, " + ("Accuracy-Flip" if flip else "no flip (timm-face)")


# --------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------


def _needs_students(arch: str) -> bool:
    import students.variants as variants

    return callable(getattr(variants, arch, None))


def model_card(
    run: RunModel,
    records: list[dict[str, Any]],
    *,
    hub_id: str | None = None,
    folder: str | None = None,
    has_onnx: bool = False,
    input_size: tuple[int, int, int] = FACE_INPUT_SIZE,
) -> str:
    """A ``README.md`` for the exported folder: results, how to load it (timm, timmface, ONNX), protocol, config."""
    import yaml

    m = run.model_config
    arch, dim = str(m.get("backbone")), int(m.get("embed_dim", 0))
    params = sum(p.numel() for p in run.backbone.parameters())
    cfg = run.config
    loss = (cfg.get("loss") or {}).get("name", "?")
    data = (cfg.get("data") or {}).get("path") or (
        "demo data" if ((cfg.get("data") or {}).get("demo") or {}).get("enabled") else "?"
    )
    teacher = (cfg.get("distill") or {}).get("teacher") or ""
    source = f"hf-hub:{hub_id}" if hub_id else f"local-dir:{folder or 'PATH/TO/THIS/FOLDER'}"
    students_line = (
        "import students  # registers timmface's face variants (" + arch + ") with timm\n"
        if _needs_students(arch)
        else ""
    )
    lines = [
        "---",
        "library_name: timm",
        "pipeline_tag: image-feature-extraction",
        "tags:",
        "- timm",
        "- timmface",
        "- face-recognition",
        "- image-feature-extraction",
        "---",
        "",
        f"# {arch} face embeddings ({dim}-d)",
        "",
        f"A face-recognition backbone trained with timmface: `{arch}` "
        f"({params / 1e6:.2f}M parameters) whose classifier outputs a {dim}-d embedding (unnormalised; compare with "
        "cosine similarity). "
        + (f"Distilled from `{teacher}`. " if teacher else "")
        + f"Loss: {loss}. Training data: `{data}`. Step {run.step}, "
        + ("EMA weights." if run.weights == "ema" else "live (non-EMA) weights."),
        "",
        "The export holds the backbone only: the margin head's class centres and any distillation projection are "
        "training-time parts and are not included.",
        "",
        "## Results",
        "",
    ]
    summary = summarise_metrics(records)
    if summary:
        lines += [
            f"Protocol: {_protocol_line(cfg)}; accuracy in percent (mean ± std over the 10 folds), measured by the "
            "trainer on the weights it evaluates (EMA once active).",
            "",
            "| set | best | best at step | last | last at step |",
            "|---|---|---|---|---|",
        ]
        for name, s in sorted(summary.items()):
            best = f"{100 * s['best']:.2f}" + (f" ± {100 * s['best_std']:.2f}" if s.get("best_std") is not None else "")
            last = f"{100 * s['last']:.2f}" + (f" ± {100 * s['last_std']:.2f}" if s.get("last_std") is not None else "")
            lines.append(f"| {name} | {best} | {s['best_step']} | {last} | {s['last_step']} |")
    else:
        lines.append("No verification results were logged for this run (no `acc/*` in metrics.jsonl).")
    lines += [
        "",
        "## Use with timm",
        "",
        f"Input: RGB face crops aligned to {input_size[1]}x{input_size[2]} (insightface's 5-point template), scaled "
        "as `(x / 255 - 0.5) / 0.5` (mean = std = 0.5, in `pretrained_cfg`).",
        "",
        "```python",
        "import timm",
        "import torch.nn.functional as F",
        *([students_line.rstrip()] if students_line else []),
        f'model = timm.create_model("{source}", pretrained=True).eval()',
        f"x = ...  # float tensor N x 3 x {input_size[1]} x {input_size[2]}, RGB in [-1, 1]",
        "embeddings = F.normalize(model(x), dim=1)",
        "```",
    ]
    if students_line:
        lines += [
            "",
            f"`{arch}` is a face variant registered by timmface's `students` package: `import students` (from "
            "`pip install timmface`) before `timm.create_model`, or timm will not know the name.",
        ]
    lines += [
        "",
        "## Use with timmface",
        "",
        "```bash",
        f"timmface eval --model {folder or 'THIS_FOLDER'} --bins lfw.bin cfp_fp.bin agedb_30.bin",
        f"timmface embed --model {folder or 'THIS_FOLDER'} --data IMAGES --out embeddings.safetensors",
        f"timmface distill ... distill.teacher={folder or 'THIS_FOLDER'}   # as a teacher",
        "```",
        "",
        "or in Python: `teachers.load_teacher(FOLDER)` returns the frozen model (RGB [-1, 1] in, embeddings out).",
    ]
    if has_onnx:
        lines += [
            "",
            "## ONNX",
            "",
            f"`model.onnx`: input `input` float32 `batch x 3 x {input_size[1]} x {input_size[2]}` (dynamic batch), "
            "RGB in [-1, 1]; output `embedding` `batch x " + str(dim) + "`. Checked against PyTorch with onnxruntime "
            f"on random batches (every embedding: cosine >= {OnnxCheck.MIN_COSINE}, relative error <= "
            f"{OnnxCheck.MAX_RELATIVE_ERROR:g}).",
        ]
    lines += [
        "",
        "## Evaluation protocol",
        "",
        "Pair verification (LFW, CFP-FP, AgeDB-30, ... `.bin` files): insightface `eval/verification.py` -- "
        "L2-normalised embeddings, squared L2 distance, thresholds 0..4 step 0.01, 10 contiguous folds, the best "
        "training-fold threshold applied to the test fold; mean and std of the fold accuracies. Accuracy-Flip sums "
        "the embeddings of each image and its mirror before normalising; timm-face's published numbers use no flip. "
        "Reproduce with `timmface eval` (add `--no-flip` for the timm-face protocol).",
        "",
        "## Training config",
        "",
        "```yaml",
        yaml.safe_dump(cfg, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Writing the folder
# --------------------------------------------------------------------------------------------------


def _face_pretrained_cfg(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, Any]:
    cfg = {k: v for k, v in dict(getattr(model, "pretrained_cfg", None) or {}).items() if k not in _SOURCE_FIELDS}
    cfg.update(FACE_DATA_CONFIG, input_size=tuple(input_size), num_classes=int(getattr(model, "num_classes", 0)))
    cfg["architecture"] = cfg.get("architecture") or type(model).__name__
    return cfg


def _input_size(model: nn.Module, kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """112x112, unless the model only takes another fixed size (e.g. a ViT built with ``img_size=96``)."""
    embed = getattr(model, "patch_embed", None)
    fixed = (
        embed is not None and getattr(embed, "strict_img_size", False) and not getattr(model, "dynamic_img_size", False)
    )
    if fixed and getattr(embed, "img_size", None) is not None:
        h, w = embed.img_size
        return (3, int(h), int(w))
    return FACE_INPUT_SIZE


def save_hub_folder(
    model: nn.Module, folder: Path, model_args: dict[str, Any], input_size: tuple[int, int, int]
) -> None:
    """``config.json`` + ``model.safetensors`` through timm's own ``save_for_hf``, so timm reads back what it wrote."""
    from timm.models import save_for_hf

    model.pretrained_cfg = _face_pretrained_cfg(model, input_size)
    kwargs: dict[str, Any] = {"model_args": dict(model_args), "safe_serialization": True}
    if "data_config" in inspect.signature(save_for_hf).parameters:  # timm >= 1.0.2x resolves the data config itself
        kwargs["data_config"] = {**FACE_DATA_CONFIG, "input_size": tuple(input_size)}
    save_for_hf(model, str(folder), **kwargs)
    for p in Path(folder).iterdir():  # safetensors creates its files 0600; every output gets the usual mode
        os.chmod(p, output_mode())


def _check_timm_reload(model: nn.Module, folder: Path, input_size: tuple[int, int, int], shown: Path) -> float:
    """Rebuild the folder with plain ``timm.create_model("local-dir:...")``; the smallest cosine to ``model``.
    Messages name ``shown`` (where the folder will be), not the temporary folder being checked."""
    import timm

    import students  # noqa: F401  (face variants must be registered for timm to build them)

    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x).float(), reloaded(x).float()
    if a.shape != b.shape:
        raise CheckpointError(f"{shown}: timm rebuilt a model with output {tuple(b.shape)}, expected {tuple(a.shape)}")
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def _require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}, which is not installed: {ONNX_EXTRA}")


@dataclass
class OnnxCheck:
    """How onnxruntime's embeddings of random batches compare with PyTorch's, per embedding (row).

    Face embeddings are compared by direction (cosine) and, since some uses keep the norm (AdaFace's quality,
    norm-weighted template pooling), by relative size; an absolute limit would depend on the embeddings' scale
    (unnormalised norms of 10 to 1000 are common), so float32 rounding alone could fail a correct export.
    """

    cosine: float
    """The smallest cosine between an onnxruntime embedding and PyTorch's."""
    relative_error: float
    """The largest ``||onnx - torch|| / ||torch||``."""

    MIN_COSINE = 0.99999
    MAX_RELATIVE_ERROR = 1e-3

    @classmethod
    def of(cls, got: Any, ref: Any) -> OnnxCheck:
        """Compare ``N x D`` arrays, in float64."""
        import numpy as np

        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        ref_norm = np.linalg.norm(ref, axis=1)
        tiny = np.finfo(np.float32).tiny
        cosine = (got * ref).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * ref_norm, tiny)
        relative = np.linalg.norm(got - ref, axis=1) / np.maximum(ref_norm, tiny)
        return cls(float(cosine.min()), float(relative.max()))

    def worst(self, other: OnnxCheck) -> OnnxCheck:
        return OnnxCheck(min(self.cosine, other.cosine), max(self.relative_error, other.relative_error))

    @property
    def ok(self) -> bool:
        return self.cosine >= self.MIN_COSINE and self.relative_error <= self.MAX_RELATIVE_ERROR

    def describe(self) -> str:
        return f"smallest cosine {self.cosine:.7f}, largest relative error {self.relative_error:.1e}"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int, int] = FACE_INPUT_SIZE,
    *,
    check_batches: tuple[int, ...] = (2, 5),
    shown: str | Path | None = None,
) -> OnnxCheck:
    """Export ``model`` (``N x 3 x H x W`` -> ``N x D``) to ONNX with a dynamic batch axis; returns the check.

    The graph is written to a temporary name, run with onnxruntime on random batches of each size in
    ``check_batches`` and compared with PyTorch (:class:`OnnxCheck`); it is renamed to ``path`` only when it passes.
    Input ``input``, output ``embedding``. Errors (CheckpointError, one line: "``shown``: not written: why") name
    ``shown`` (default ``path``), never the temporary file. Needs the ``timmface[onnx]`` extra (onnx, onnxruntime,
    onnxscript).
    """
    _require_onnx()
    import warnings

    import onnxruntime as ort

    path = Path(path)
    shown = path if shown is None else shown
    model = model.eval()
    example = torch.randn(2, *input_size)
    try:
        with atomic_path(path, hidden=True) as tmp:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                # the dynamo exporter: the TorchScript one cannot export timm's antialiased pos-embedding resampling
                torch.onnx.export(
                    model, (example,), str(tmp), input_names=["input"], output_names=["embedding"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False, verbose=False,
                )  # fmt: skip
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            check = OnnxCheck(1.0, 0.0)
            g = torch.Generator().manual_seed(0)
            for n in check_batches:
                x = torch.rand(n, *input_size, generator=g) * 2 - 1
                with torch.no_grad():
                    ref = model(x).float().numpy()
                got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
                if got.shape != ref.shape:
                    raise CheckpointError(
                        f"{shown}: not written: ONNX output has shape {got.shape} for a batch of {n}, "
                        f"PyTorch {ref.shape}"
                    )
                check = check.worst(OnnxCheck.of(got, ref))
            if not check.ok:
                raise CheckpointError(
                    f"{shown}: not written: ONNX output differs from PyTorch ({check.describe()}; needs cosine >= "
                    f"{OnnxCheck.MIN_COSINE} and relative error <= {OnnxCheck.MAX_RELATIVE_ERROR:g})"
                )
    except TimmfaceError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{shown}: not written: ONNX export failed ({type(e).__name__}: {first})") from None
    return check


def check_repo_id(repo_id: str) -> str:
    from timmface.hub import check_repo_id as check

    return check(repo_id, "--push-to-hub")


def push_folder(
    folder: str | Path, repo_id: str, *, private: bool = False, message: str | None = None
) -> tuple[str, str | None]:
    """Create the Hub model repository ``repo_id`` (if needed) and upload ``folder`` as one commit; returns the
    repository URL and that commit's hash (what ``hf-hub:OWNER/NAME@<commit>`` loads back exactly)."""
    import huggingface_hub

    check_repo_id(repo_id)
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model",
            commit_message=message or f"Upload {Path(folder).name} exported with timmface",
        )  # fmt: skip
    except Exception as e:  # network, auth, permission: huggingface_hub raises its own HTTP error types
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise TimmfaceError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {first})") from None
    commit = getattr(info, "oid", None)  # huggingface_hub's CommitInfo
    return str(url), str(commit) if commit else None


@dataclass
class ExportResult:
    folder: Path
    checkpoint: Path
    weights: str
    """``"ema"`` or ``"model"``."""
    files: list[str]
    reload_cosine: float
    """Smallest cosine between timm's reload of the folder and the run's backbone (1.0 when identical)."""
    onnx_check: OnnxCheck | None = None
    """How ``model.onnx`` compared with PyTorch (None: not asked for, or not written)."""
    onnx_error: str | None = None
    """Why ``model.onnx`` was asked for but not written (the timm folder was written all the same)."""
    url: str | None = None
    commit: str | None = None
    """The Hub commit the upload made (``--push-to-hub``)."""


# what an export folder holds; beside it, what timmface writes into one later (eval results of the exported model)
EXPORT_FILES = ("config.json", "model.safetensors", "README.md")
_EXPORT_EXTRAS = ("model.onnx", "eval.json", "eval_*_roc.png")


def _check_output(out: Path, overwrite: bool, protect: list[Path]) -> None:
    """``--overwrite`` replaces only a previous export: never the run being exported, nor any other folder."""
    if out.is_dir() and any(out.iterdir()) and overwrite:
        for p in protect:
            if p.resolve().is_relative_to(out.resolve()):
                raise ConfigError(f"{out}: --overwrite would delete {p}, which lives inside it; choose another --out")
    replaceable_folder(out, overwrite, what="timmface export", required=EXPORT_FILES, allowed=_EXPORT_EXTRAS)


def export_run(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    onnx: bool = False,
    overwrite: bool = False,
    ema: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
) -> ExportResult:
    """Export a run directory or checkpoint to the timm hub folder ``out`` (see the module docstring).

    The folder is assembled under a temporary name beside ``out`` -- weights and config by timm's ``save_for_hf``,
    checked by rebuilding it with ``timm.create_model("local-dir:...")``; ``model.onnx`` (``onnx``) checked with
    onnxruntime; ``README.md`` -- and renamed to ``out`` only when every check passed. ``push_to_hub`` then uploads it.
    """
    out = Path(out)
    if push_to_hub:
        check_repo_id(push_to_hub)
    if onnx:
        _require_onnx()
    ckpt_path, run_dir = find_checkpoint(source)
    _check_output(out, overwrite, [ckpt_path, *([run_dir] if run_dir else [])])
    run = load_run_model(ckpt_path, ema=ema)
    run.run_dir = run_dir
    model = run.backbone
    kwargs = dict(run.model_config.get("kwargs") or {})
    input_size = _input_size(model, kwargs)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    onnx_check: OnnxCheck | None = None
    onnx_error: str | None = None
    try:
        save_hub_folder(model, tmp, kwargs, input_size)
        cosine = _check_timm_reload(model, tmp, input_size, shown=out)
        if not cosine >= 0.99999:
            raise CheckpointError(
                f"{out}: timm's reload of the exported folder differs from the run (cosine {cosine:.6f})"
            )
        if onnx:  # a failed ONNX export or check costs the ONNX file only: the timm folder is still written
            try:
                onnx_check = export_onnx(model, tmp / "model.onnx", input_size, shown=out / "model.onnx")
            except CheckpointError as e:
                onnx_error = str(e)
        records = _read_records(run_dir)
        card = model_card(
            run, records, hub_id=push_to_hub, folder=str(out), has_onnx=onnx_check is not None, input_size=input_size
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
        os.chmod(tmp / "README.md", output_mode())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:  # disk full, permissions: one line naming the folder being written
        raise CheckpointError(f"{out}: cannot write the export ({e.strerror or type(e).__name__})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = ExportResult(
        folder=out, checkpoint=ckpt_path, weights=run.weights, files=sorted(p.name for p in out.iterdir()),
        reload_cosine=cosine, onnx_check=onnx_check, onnx_error=onnx_error,
    )  # fmt: skip
    if push_to_hub and onnx_error is None:  # never upload a folder that lacks what was asked for
        result.url, result.commit = push_folder(out, push_to_hub, private=private)
    return result


def _read_records(run_dir: Path | None) -> list[dict[str, Any]]:
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return []
    from timmface.metrics import read_metrics

    return read_metrics(run_dir)


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an exported folder."""
    return json.loads((Path(folder) / "config.json").read_text())
