"""``timmface ckpt merge RUN_OR_CKPT [--out FILE]``: one plain checkpoint from a sharded one.

A run with ``head.sharded=true`` keeps its class centres (and their optimiser state) in one file
per rank. ``merge`` writes a single checkpoint with the full ``C x D`` matrix in ``head.weight`` and
the centres' optimiser state back in ``optimizer`` -- the layout of an unsharded run, so every tool
that reads checkpoints (and ``torch.load(weights_only=True)``) can use it, and a run can resume from
it with or without sharding, at any world size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from timmface.checkpoint import atomic_save, checkpoint_shards, list_checkpoints, load_checkpoint, merge_checkpoint
from timmface.errors import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    merge = sub.add_parser(
        "merge",
        help="write the full class-centre matrix of a sharded checkpoint as one file",
        description="Write one plain checkpoint from a run with head.sharded=true: the full C x D class-centre "
        "matrix and its optimiser state, as an unsharded run saves them. Any tool can read it, and a run can resume "
        "from it with or without sharding, at any number of GPUs.",
    )
    merge.add_argument("source", metavar="RUN_OR_CKPT", help="run directory (its newest checkpoint) or step_*.pt file")
    merge.add_argument("--out", metavar="FILE", help="where to write (default: <checkpoint>.merged.pt beside it)")


def resolve_checkpoint(source: str | Path) -> Path:
    """A run directory -> its newest complete checkpoint; a file -> itself."""
    p = Path(source)
    if p.is_dir():
        run_dir = p.parent if p.name == "checkpoints" and not (p / "checkpoints").is_dir() else p
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"{p}: no complete checkpoints/step_*.pt in this folder")
        return found[-1][1]
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    return p


def merge(source: str | Path, out: str | Path | None = None) -> Path:
    """Write the merged checkpoint of ``source``; returns its path."""
    path = resolve_checkpoint(source)
    ckpt = load_checkpoint(path)
    shards = checkpoint_shards(path, ckpt)
    merged = merge_checkpoint(path, ckpt)
    target = Path(out) if out else path.with_name(path.name.removesuffix(".pt") + ".merged.pt")
    if target.resolve() == path.resolve() or target.resolve() in {s.resolve() for s in shards}:
        raise CheckpointError(f"{target}: --out would overwrite the checkpoint being merged")
    atomic_save(merged, target)
    weight = (merged.get("head") or {}).get("weight")
    shape = f"{tuple(weight.shape)[0]} x {tuple(weight.shape)[1]} class centres" if weight is not None else "no head"
    source_desc = f"{len(shards)} rank files" if ckpt.get("sharding") else "an unsharded checkpoint"
    print(f"wrote {target} ({shape}, step {merged['step']}, from {source_desc})", flush=True)
    return target


def run(args: argparse.Namespace) -> int:
    if args.ckpt_command == "merge":
        merge(args.source, args.out)
    return 0
