"""``timmface eval --model SPEC [--bins ...] [--ijb DIR]``: verification accuracy and IJB TAR@FAR of any face model.

SPEC is a timmface run directory or checkpoint (its backbone, EMA weights when present -- exactly what the trainer
evaluates) or anything :func:`teachers.load_teacher` reads (insightface iResNet ``.pth``, AdaFace ``.ckpt``, a timm
hub folder, an ONNX file), also from the Hugging Face Hub: ``hf-hub:OWNER/REPO[@REVISION][/FILE]``, and ``--bins``
take ``hf://OWNER/REPO[@REVISION]/FILE.bin`` of a dataset repository (:mod:`timmface.hub`; ``eval.json`` records
the commit and files). ``.bin`` sets follow insightface's 10-fold protocol with Accuracy-Flip (``--no-flip``:
timm-face's published protocol); IJB-B/C follow :mod:`timmface.evaluation.ijb`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from timmface.errors import ConfigError, DataError
from timmface.fileio import atomic_write
from timmface.hub import Resolved, data_file, is_data_spec, is_hub_spec, parse

__all__ = ["LoadedModel", "add_arguments", "bin_protocol", "default_json_path", "load_model", "run"]

AMP = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready to embed: RGB float ``N x 3 x 112 x 112`` in [-1, 1] -> unnormalised ``N x D``."""

    module: nn.Module
    spec: str
    info: dict[str, Any]
    fingerprint: str
    run_dir: Path | None = None
    checkpoint: Path | None = None
    config: dict[str, Any] | None = None
    """The training config, for timmface runs and checkpoints."""


def load_model(spec: str, *, ema: bool = True, arch: str | None = None) -> LoadedModel:
    """Load SPEC (see the module docstring) in eval mode on the CPU."""
    from teachers import load_teacher, teacher_fingerprint
    from timmface.export import is_timmface_checkpoint, load_run_model

    if not is_hub_spec(spec) and is_timmface_checkpoint(spec):
        run = load_run_model(spec, ema=ema)
        if arch is not None and arch != run.model_config.get("backbone"):
            raise ConfigError(f"{spec}: holds a '{run.model_config.get('backbone')}' model but --arch {arch} was given")
        fingerprint = teacher_fingerprint(run.checkpoint) + ("" if run.weights == "ema" else ":model")
        return LoadedModel(run.backbone, spec, run.info(), fingerprint, run.run_dir, run.checkpoint, run.config)
    teacher = load_teacher(spec, arch=arch)
    info = dict(teacher.teacher_info)
    # a Hub id: fingerprint the commit it resolved to (info["source"], pinned), not whatever a branch says now
    return LoadedModel(teacher, spec, info, teacher_fingerprint(info["source"] if is_hub_spec(spec) else spec))


def bin_protocol(flip: bool) -> str:
    return "insightface 10-fold, " + ("Accuracy-Flip" if flip else "no flip (timm-face)")


def default_json_path(loaded: LoadedModel) -> Path:
    """Next to the model: ``RUN/eval.json``, ``FOLDER/eval.json``, or ``<file>.eval.json`` beside a file (a
    checkpoint of a run included: an older checkpoint must not overwrite the run's own results). A Hub model
    writes ``OWNER--REPO[--FILE].eval.json`` in the current folder, never into the hub cache."""
    if is_hub_spec(loaded.spec):
        ref = parse(loaded.spec)
        return Path(ref.repo_id.replace("/", "--") + (f"--{Path(ref.path).stem}" if ref.path else "") + ".eval.json")
    p = Path(loaded.spec)
    if p.is_file():
        return p.with_name(p.name.rsplit(".", 1)[0] + ".eval.json")
    if loaded.run_dir is not None:
        return loaded.run_dir / "eval.json"
    return p / "eval.json"


def _run_val_sets(config: dict[str, Any] | None) -> list[str]:
    """The verification sets a run was evaluated on: ``data.val_sets`` (``hf://`` ids pinned to their commit by
    the trainer), else the ``*.bin`` beside its data -- for the built-in demo, its data in timmface's cache, found
    (or generated again, identically) as the trainer does."""
    data = (config or {}).get("data") or {}
    if data.get("val_sets"):
        return [str(p) for p in data["val_sets"] if is_data_spec(p) or Path(p).is_file()]
    if not data.get("path") and (data.get("demo") or {}).get("enabled"):
        path = _demo_folder(data["demo"])
    else:
        path = Path(data.get("path") or "")
    return [str(p) for p in sorted(path.glob("*.bin"))] if str(path) != "." and path.is_dir() else []


def _demo_folder(demo: dict[str, Any]) -> Path:
    from timmface.config import config_from_dict
    from timmface.trainer import demo_data_path

    settings = config_from_dict({"data": {"demo": demo}}, source="the run's data.demo").data.demo
    return Path(demo_data_path(settings))


def _nothing_to_evaluate(loaded: LoadedModel) -> ConfigError:
    """Where the run's own sets were looked for, and what to pass instead."""
    data = (loaded.config or {}).get("data") or {}
    if loaded.config is None:
        where = f"{loaded.spec} is not a timmface run, so it has no verification sets of its own"
    elif data.get("val_sets"):
        where = f"none of the run's data.val_sets exists ({', '.join(map(str, data['val_sets']))})"
    elif data.get("path"):
        where = f"the run's data folder {data['path']} holds no *.bin"
    else:
        where = "the run names no data.path or data.val_sets"
    return ConfigError(f"nothing to evaluate: {where}; give --bins FILE.bin ... and/or --ijb DIR")


def _resolve_bins(specs: list[str]) -> tuple[list[Path], dict[str, Resolved]]:
    """Local ``.bin`` files for paths and ``hf://`` ids; the Hub ones' resolutions, by local path."""
    bins, sources = [], {}
    for spec in specs:
        path, resolved = data_file(spec)
        if not path.is_file():
            raise DataError(f"{path}: verification set not found")
        bins.append(path)
        if resolved is not None:
            sources[str(path)] = resolved
    return bins, sources


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="run directory, checkpoint, teacher file or folder, or hf-hub:OWNER/REPO[@REVISION][/FILE]",
    )
    parser.add_argument(
        "--bins",
        nargs="+",
        default=[],
        metavar="FILE.bin",
        help="verification sets (lfw.bin cfp_fp.bin ... or hf://OWNER/REPO[@REVISION]/lfw.bin); default: a run's own",
    )
    parser.add_argument("--ijb", metavar="DIR", help="IJB release folder holding IJBB/ and/or IJBC/")
    parser.add_argument("--ijb-set", nargs="+", default=["IJBC"], choices=["IJBB", "IJBC"], help="IJB sets (IJBC)")
    parser.add_argument("--ijb-meta", metavar="DIR", help="folder with the IJB metadata, when not in <set>/meta")
    parser.add_argument(
        "--ijb-protocol",
        choices=["insightface", "adaface", "timm-face"],
        help="IJB preset (flip, norm fusion, detector score); the flags below adjust it",
    )
    parser.add_argument(
        "--no-flip", action="store_true", help="no flip TTA (timm-face's published protocol) for .bin and IJB"
    )
    parser.add_argument(
        "--norm-fusion",
        action="store_true",
        help="IJB: keep image-feature norms when pooling templates (insightface N1)",
    )
    parser.add_argument(
        "--detector-score",
        action="store_true",
        help="IJB: weight image features by the detector's faceness score (insightface D1)",
    )
    parser.add_argument(
        "--ijb-interpolation",
        choices=["bilinear", "bicubic"],
        help="IJB alignment resampling (default: the preset's, else bilinear as insightface)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass (default 256; lower it if memory is short)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="(default: min(4, CPUs)) IJB image decoding/alignment processes",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--amp", choices=sorted(AMP), default="none", help="autocast dtype for the forward passes")
    parser.add_argument("--no-ema", action="store_true", help="timmface runs: evaluate the live weights, not the EMA")
    parser.add_argument("--arch", default=None, help="teacher architecture override (e.g. iresnet100)")
    parser.add_argument("--json", metavar="OUT", help="results file (default: next to the model)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def _ijb_protocol(args: argparse.Namespace) -> Any:
    """The preset of ``--ijb-protocol`` (or flip + L2-normalised images + no detector score), adjusted by the flags."""
    from timmface.evaluation.ijb import PROTOCOLS, IJBProtocol

    proto = PROTOCOLS[args.ijb_protocol] if args.ijb_protocol else IJBProtocol(norm_fusion=False, detector_score=False)
    changes: dict[str, Any] = {"flip": False} if args.no_flip else {}
    changes.update({"norm_fusion": True} if args.norm_fusion else {})
    changes.update({"detector_score": True} if args.detector_score else {})
    if args.ijb_interpolation:
        changes["interpolation"] = args.ijb_interpolation
    return dataclasses.replace(proto, **changes)


def _evaluate_bins(
    model: nn.Module, bins: list[Path], args: argparse.Namespace, image_size: int = 112
) -> dict[str, dict[str, Any]]:
    """``image_size``: what the images are resized to when they differ (a run's ``data.image_size``, as its
    in-training evaluation does; 112 for everything else)."""
    from timmface.evaluation.verification import evaluate_bin
    from timmface.progress import CountProgress

    flip = not args.no_flip
    out = {}
    for path in bins:
        bar = CountProgress(f"eval {path.stem}", enabled=not args.no_progress)
        try:
            r = evaluate_bin(
                model, path, batch_size=args.batch_size, flip=flip, amp_dtype=AMP[args.amp], image_size=image_size,
                progress=bar.set,
            )  # fmt: skip
        finally:
            bar.close()
        out[path.stem] = {
            "path": str(path),
            "accuracy": r.accuracy,
            "std": r.std,
            "threshold": r.threshold,
            "fold_accuracies": r.fold_accuracies,
            "fold_thresholds": r.fold_thresholds,
            "flip": flip,
            "protocol": bin_protocol(flip),
        }
    return out


def _evaluate_ijb(model: nn.Module, device: torch.device, args: argparse.Namespace, json_path: Path) -> dict[str, Any]:
    from timmface.evaluation.ijb import evaluate_ijb, make_embed_fn, save_roc_png
    from timmface.progress import CountProgress

    proto = _ijb_protocol(args)
    embed_fn = make_embed_fn(model, device=device, dtype=AMP[args.amp], batch_size=args.batch_size)
    out = {}
    for set_name in args.ijb_set:
        bar = CountProgress(f"eval {set_name}", enabled=not args.no_progress)
        try:
            r = evaluate_ijb(
                args.ijb, set_name, embed_fn, protocol=proto, meta_dir=args.ijb_meta, batch_size=args.batch_size,
                num_workers=args.workers, device=device, progress=bar.set,
            )  # fmt: skip
        finally:
            bar.close()
        png: str | None = None
        try:
            path = json_path.with_name(f"{json_path.stem}_{set_name}_roc.png")
            save_roc_png(r, path, title=f"ROC on {set_name}")
            png = str(path)
        except ImportError:  # matplotlib is the optional extra timmface[plot]
            from timmface.report import PLOT_HINT

            print(f"note: no ROC plot for {set_name}: it {PLOT_HINT}")
        out[set_name] = {
            "root": str(args.ijb),
            "protocol": r.protocol,
            "flip": proto.flip,
            "norm_fusion": proto.norm_fusion,
            "detector_score": proto.detector_score,
            "tar_at_far": {f"{far:.0e}": tar for far, tar in r.tar_at_far.items()},
            "auc": r.auc,
            "n_images": r.n_images,
            "n_failed_images": r.n_failed_images,
            "n_templates": r.n_templates,
            "n_pairs": r.n_pairs,
            "n_pairs_excluded": r.n_pairs_excluded,
            "roc_png": png,
        }
    return out


def _print_tables(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if results["bins"]:
        table = Table(title=f"verification: {results['model']}")
        for col in ("set", "accuracy (%)", "threshold", "protocol"):
            table.add_column(col, justify="right" if col in ("accuracy (%)", "threshold") else "left")
        for name, r in results["bins"].items():
            acc = f"{100 * r['accuracy']:.2f} ± {100 * r['std']:.2f}"
            table.add_row(name, acc, f"{r['threshold']:.3f}", r["protocol"])
        console.print(table)
    if results["ijb"]:
        fars = next(iter(results["ijb"].values()))["tar_at_far"]
        table = Table(title="IJB 1:1 verification, TAR (%) at FAR")
        table.add_column("set")
        for far in fars:
            table.add_column(far, justify="right")
        table.add_column("protocol")
        for name, r in results["ijb"].items():
            table.add_row(name, *(f"{100 * v:.2f}" for v in r["tar_at_far"].values()), r["protocol"])
        console.print(table)


def _write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path, hidden=True) as f:
            f.write((json.dumps(results, indent=2, default=str) + "\n").encode())
    except OSError as e:
        raise DataError(f"{path}: cannot write the results ({e.strerror}); choose another --json") from None


def run(args: argparse.Namespace) -> int:
    from timmface.runtime import pick_device

    bins, sources = _resolve_bins(args.bins)
    loaded = load_model(args.model, ema=not args.no_ema, arch=args.arch)
    if not bins and not args.ijb:
        specs = _run_val_sets(loaded.config)
        if not specs:
            raise _nothing_to_evaluate(loaded)
        print(f"evaluating the run's verification sets: {', '.join(specs)}")
        bins, sources = _resolve_bins(specs)
    device = pick_device(args.device)
    model = loaded.module.to(device).eval()
    json_path = Path(args.json) if args.json else default_json_path(loaded)
    results: dict[str, Any] = {
        "model": loaded.spec,
        "model_info": loaded.info,
        "fingerprint": loaded.fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "amp": args.amp,
        "bins": _evaluate_bins(
            model, bins, args, int(((loaded.config or {}).get("data") or {}).get("image_size") or 112)
        ),
        "ijb": _evaluate_ijb(model, device, args, json_path) if args.ijb else {},
    }
    for entry in results["bins"].values():  # a Hub set is named by its pinned id, with its commit and file
        if entry["path"] in sources:
            entry.update(path=sources[entry["path"]].pinned, hub=sources[entry["path"]].record())
    _print_tables(results)
    _write_json(json_path, results)
    print(f"results written to {json_path}")
    return 0
