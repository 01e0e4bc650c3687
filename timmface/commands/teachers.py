"""``timmface teachers inspect PATH``: load a teacher and show what was detected."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser(
        "inspect",
        help="load a teacher checkpoint and show its format, architecture and input convention",
        description="Load a teacher (file or folder) and show what was detected.",
    )
    p.add_argument(
        "path",
        help="teacher checkpoint, run directory, timm hub folder or ONNX file, or hf-hub:OWNER/REPO[@REVISION][/FILE]",
    )
    p.add_argument("--arch", default=None, help="override architecture detection (e.g. iresnet100, ir_101)")


def _rows(info: dict[str, object], fingerprint: str) -> list[tuple[str, str]]:
    params = info.get("parameters")
    size = info.get("input_size")
    rows = [
        ("format", str(info.get("format"))),
        ("architecture", str(info.get("architecture"))),
        ("depth", "-" if info.get("depth") is None else str(info.get("depth"))),
        ("parameters", f"{params:,}" if isinstance(params, int) else "unknown"),
        ("input", str(info.get("input"))),
        ("input size", " x ".join(str(s) for s in size) if isinstance(size, (tuple, list)) else str(size)),
        ("embedding size", str(info.get("embed_dim"))),
    ]
    for key in ("container", "weights", "step", "batch"):
        if info.get(key) is not None:
            rows.append((key, str(info[key])))
    hub = info.get("hub")
    if isinstance(hub, dict):  # a Hub id: which revision it asked for, the commit that gave, the files used
        rows.append(("hub", f"{hub['repo_id']} @ {hub['revision']} = commit {hub['commit']}"))
        rows.append(("hub files", ", ".join(hub["files"])))
    rows += [("source", str(info.get("source"))), ("fingerprint", fingerprint)]
    return rows


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from teachers import load_teacher, teacher_fingerprint

    if args.action != "inspect":  # argparse only allows "inspect" today
        raise SystemExit(f"unknown teachers action {args.action}")
    teacher = load_teacher(args.path, arch=args.arch)
    table = Table(title=f"teacher: {args.path}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    # a Hub id: the fingerprint of the commit just loaded (its pinned source), not of whatever a branch says next
    source = teacher.teacher_info["source"] if "hub" in teacher.teacher_info else args.path
    for key, value in _rows(teacher.teacher_info, teacher_fingerprint(source)):
        table.add_row(key, value)
    Console().print(table)
    return 0
