"""``timmface distill --teacher PATH --config FILE.yaml [key=value ...]``."""

from __future__ import annotations

import argparse

import yaml

from timmface.commands.train import add_config_arguments
from timmface.config import load_config, to_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--teacher",
        help="teacher checkpoint, run directory, timm hub folder, ONNX file or hf-hub:OWNER/REPO[@REVISION][/FILE] "
        "(shorthand for distill.teacher=PATH)",
    )
    parser.add_argument("--cache", help="teacher-embedding cache from `timmface embed --cache` (distill.cache=PATH)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    extra = []
    if args.teacher:
        extra.append(f"distill.teacher={args.teacher}")
    if args.cache:
        extra.append(f"distill.cache={args.cache}")
    cfg = load_config(args.config, [*extra, *args.overrides])
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from timmface.distill import DistillTrainer

    DistillTrainer(cfg).fit()
    return 0
