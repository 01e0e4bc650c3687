"""``timmface train --config FILE.yaml [key=value ...]``."""

from __future__ import annotations

import argparse

import yaml

from timmface.config import Config, load_config, to_dict


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (defaults for every key not given)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. optim.lr=5e-4 model.kwargs.patch_size=8",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def resolve(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    return load_config(args.config, [*(extra or []), *args.overrides])


def run_config(cfg: Config, print_only: bool = False) -> int:
    if print_only:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from timmface.trainer import Trainer

    Trainer(cfg).fit()
    return 0


def run(args: argparse.Namespace) -> int:
    return run_config(resolve(args), args.print_config)
