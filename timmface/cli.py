"""The ``timmface`` command line: ``timmface <command> ...``.

Each command lives in ``timmface/commands/<module>.py`` and provides ``add_arguments(parser)`` and
``run(args) -> int``. :func:`main` takes ``argv`` so tests run the real CLI in-process.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from timmface.errors import TimmfaceError

DESCRIPTION = (
    "timm backbones for face recognition: train with margin losses, distil from a frozen teacher, evaluate, "
    "embed and export. Run 'timmface COMMAND --help' for the options of a command."
)

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("timmface.commands.train", "train a timm backbone with a margin loss"),
    "distill": ("timmface.commands.distill", "train a student with a margin loss plus distillation from a teacher"),
    "eval": ("timmface.commands.eval", "evaluate a model on .bin verification sets and IJB-B/C"),
    "embed": ("timmface.commands.embed", "write embeddings (or a teacher cache) of a dataset"),
    "export": ("timmface.commands.export", "export a run to a timm hub folder and ONNX"),
    "report": ("timmface.commands.report", "plot and summarise a run's metrics"),
    "data": ("timmface.commands.data", "dataset tools: pack an image folder, inspect a dataset"),
    "teachers": ("timmface.commands.teachers", "teacher tools: inspect a checkpoint"),
    "ckpt": ("timmface.commands.ckpt", "checkpoint tools: merge sharded class centres"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("timmface")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from timmface import __version__

        return __version__


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Give every parser of the tree its full command name (``timmface data pack``) as the default of ``_prog``:
    argparse keeps the innermost subcommand's defaults, so errors can name exactly the command that failed."""
    parser.set_defaults(_prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _name_commands(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timmface", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # command not built in this version
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    _name_commands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 for a user error reported in one line)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    failed = True
    try:
        code = int(args._run(args) or 0)
        failed = code != 0
        return code
    except TimmfaceError as e:
        print(f"{args._prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args._prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        from timmface.distributed import shutdown_distributed

        shutdown_distributed(failed=failed)


if __name__ == "__main__":
    sys.exit(main())
