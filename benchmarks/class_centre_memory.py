"""Class-centre memory per rank, replicated vs sharded, computed from tensor shapes (nothing is allocated).

    python benchmarks/class_centre_memory.py                 # the table in benchmarks/RESULTS.md
    python benchmarks/class_centre_memory.py --dim 512 --classes 93431 2000000 --ranks 1 8 64

Per class centre and rank: the fp32 weight row, AdamW's two fp32 moments and the fp32 gradient,
i.e. 4 x 4 x D bytes. Replicated (plain DDP) every rank holds all C rows; sharded (``head.sharded``)
rank r holds ``C // W`` rows, +1 for the first ``C % W`` ranks -- the table shows the largest shard.
The logits are not counted: with sharding each rank scores the *gathered* batch against its rows,
``(W x b) x (C / W) = b x C`` values, the same as a replicated head scores its local batch ``b``.
"""

from __future__ import annotations

import argparse
import math

# MS1MV3 (93,431 identities), Glint360K (360,232), and a round 2M (WebFace42M has ~2.06M)
DEFAULT_CLASSES = (93_431, 360_232, 2_000_000)
DEFAULT_RANKS = (1, 8, 64)
TENSORS = {"weight": 4, "adamw_exp_avg": 4, "adamw_exp_avg_sq": 4, "grad": 4}  # bytes per element


def bytes_per_rank(num_classes: int, dim: int, world_size: int, sharded: bool) -> int:
    """Bytes of class-centre state on the rank holding the most rows."""
    rows = math.ceil(num_classes / world_size) if sharded else num_classes
    return rows * dim * sum(TENSORS.values())


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f}"


def table(classes: tuple[int, ...], ranks: tuple[int, ...], dim: int) -> str:
    """A Markdown table: one row per class count, replicated and sharded GiB per rank for each world size."""
    head = ["classes"] + [f"W={w} replicated" for w in ranks] + [f"W={w} sharded" for w in ranks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in classes:
        cells = [f"{c:,}"]
        cells += [_gib(bytes_per_rank(c, dim, w, sharded=False)) for w in ranks]
        cells += [_gib(bytes_per_rank(c, dim, w, sharded=True)) for w in ranks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    parser.add_argument("--classes", type=int, nargs="+", default=list(DEFAULT_CLASSES))
    parser.add_argument("--ranks", type=int, nargs="+", default=list(DEFAULT_RANKS))
    args = parser.parse_args(argv)
    print(f"class-centre memory per rank, GiB (fp32 weight + AdamW exp_avg + exp_avg_sq + grad, D={args.dim}; "
          "computed from shapes)")  # fmt: skip
    print(table(tuple(args.classes), tuple(args.ranks), args.dim))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
