"""``timmface export RUN_OR_CKPT --out DIR [--onnx] [--push-to-hub OWNER/NAME]``: a run's backbone as a hub folder."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CKPT", help="run directory (newest checkpoint) or checkpoint file")
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder to write (config.json, model.safetensors, README.md)"
    )
    parser.add_argument(
        "--onnx", action="store_true", help="also write model.onnx (dynamic batch), checked with onnxruntime"
    )
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the folder to this Hugging Face model repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-ema", action="store_true", help="export the live weights even when the run has an EMA")


def run(args: argparse.Namespace) -> int:
    from timmface.errors import TimmfaceError
    from timmface.export import export_run

    result = export_run(
        args.source, args.out, onnx=args.onnx, overwrite=args.overwrite, ema=not args.no_ema,
        push_to_hub=args.push_to_hub, private=args.private,
    )  # fmt: skip
    print(f"exported {result.checkpoint} ({result.weights} weights) -> {result.folder}: {', '.join(result.files)}")
    print(f"checked: timm.create_model('local-dir:{result.folder}') reproduces it (cosine {result.reload_cosine:.6f})")
    if result.onnx_check is not None:
        print(f"checked: model.onnx matches PyTorch under onnxruntime ({result.onnx_check.describe()})")
    if result.url:
        pinned = f"; this upload: hf-hub:{args.push_to_hub}@{result.commit}" if result.commit else ""
        print(f"uploaded to {result.url}: load it with hf-hub:{args.push_to_hub}{pinned}")
    if result.onnx_error:
        skipped = f"; not uploaded to {args.push_to_hub}" if args.push_to_hub else ""
        raise TimmfaceError(f"{result.onnx_error}; the timm folder {result.folder} was written without it{skipped}")
    return 0
