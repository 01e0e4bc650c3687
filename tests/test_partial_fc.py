"""Sharded Partial FC in one process: shard arithmetic, sharding-independent initialisation, the
one-shard head against the plain head, clipping, and the class-centre memory table.

The multi-rank behaviour (gathers, distributed softmax, gradients across ranks) is tested with
2 processes in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from timmface.losses import build_loss
from timmface.model import MarginHead, num_sampled_classes
from timmface.partial_fc import (
    ShardedMarginHead,
    clip_grad_norm_sharded,
    distributed_cross_entropy,
    init_centre_rows,
    scale_grad,
    shard_range,
    shard_sample_counts,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("classes,world", [(11, 2), (93_431, 8), (7, 8), (64, 64), (1000, 3)])
def test_shards_tile_the_classes(classes: int, world: int):
    ranges = [shard_range(classes, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and sum(n for _, n in ranges) == classes
    for (s0, n0), (s1, _) in zip(ranges, ranges[1:]):
        assert s0 + n0 == s1  # contiguous
    sizes = [n for _, n in ranges]
    assert sizes == [classes // world + (r < classes % world) for r in range(world)]


def test_sample_counts_split_in_proportion():
    assert shard_sample_counts(16_384, 93_431, 8) == [2048] * 8
    assert shard_sample_counts(5, 11, 2) == [3, 2]  # shards of 6 and 5
    for k, c, w in [(10, 20, 2), (100, 1001, 7), (9343, 93431, 64), (3, 7, 8)]:
        counts = shard_sample_counts(k, c, w)
        assert sum(counts) == k and len(counts) == w
        for r, n in enumerate(counts):
            assert abs(n - k * shard_range(c, r, w)[1] / c) < 1  # within one of the exact share
    # a rate is the same total as the unsharded head's
    assert sum(shard_sample_counts(num_sampled_classes(0.1, 93_431), 93_431, 8)) == 9343


def test_initial_centres_do_not_depend_on_the_world_size():
    full = init_centre_rows(0, 10_000, 4, 0.01, seed=3, block=1024)
    for world in (2, 3, 8):
        parts = [init_centre_rows(*shard_range(10_000, r, world), 4, 0.01, seed=3, block=1024) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    assert full.std().item() == pytest.approx(0.01, rel=0.05)
    assert not torch.equal(full, init_centre_rows(0, 10_000, 4, 0.01, seed=4, block=1024))


@pytest.mark.parametrize("name", ["cosface", "arcface", "adaface"])
def test_one_shard_equals_the_plain_head(name: str):
    head = ShardedMarginHead(13, 8, build_loss(name))
    assert head.local_range == (0, 13)
    ref = MarginHead(13, 8, build_loss(name))
    with torch.no_grad():
        ref.weight.copy_(head.weight)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(9, 8, generator=g) * 4
    labels = torch.randint(0, 13, (9,), generator=g)
    x1, x2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    out = head(x1, labels)
    want = ref(x2, labels)
    out["margin"].backward()
    want["margin"].backward()
    torch.testing.assert_close(out["margin"], want["margin"])
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(head.weight.grad, ref.weight.grad)
    torch.testing.assert_close(out["norms"], emb.norm(dim=1))


def test_distributed_cross_entropy_matches_cross_entropy_in_one_process():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 10, generator=g) * 20).requires_grad_()
    labels = torch.randint(0, 10, (6,), generator=g)
    ref = logits.detach().clone().requires_grad_()
    loss = distributed_cross_entropy(logits, labels)
    (2 * loss).backward()
    (2 * F.cross_entropy(ref, labels)).backward()
    torch.testing.assert_close(loss, F.cross_entropy(ref, labels))
    torch.testing.assert_close(logits.grad, ref.grad)


def test_partial_fc_in_one_shard_keeps_positives():
    torch.manual_seed(0)
    head = ShardedMarginHead(100, 8, build_loss("cosface"), partial_fc=0.2).train()
    labels = torch.tensor([3, 50, 50, 99])
    head(torch.randn(4, 8), labels)
    assert head.num_sampled_local == 20 and head.last_index.numel() == 20
    assert {3, 50, 99} <= set(head.last_index.tolist())
    head.eval()
    head(torch.randn(4, 8), labels)
    assert head.last_index is None  # evaluation scores against every centre


def test_scale_grad_and_clip_in_one_process():
    x = torch.ones(3, requires_grad=True)
    (scale_grad(x, 4.0) * 2).sum().backward()
    assert x.grad.tolist() == [8.0, 8.0, 8.0]
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    a2, b2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a2.grad, b2.grad = a.grad.clone(), b.grad.clone()
    total = clip_grad_norm_sharded([a], [b], 1.0)
    want = torch.nn.utils.clip_grad_norm_([a2, b2], 1.0)
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_class_centre_memory_table():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import class_centre_memory as ccm
    finally:
        sys.path.pop(0)
    # 2M classes x 512 x (weight + 2 AdamW moments + grad) x 4 bytes, split over 64 ranks
    assert ccm.bytes_per_rank(2_000_000, 512, 64, sharded=True) == 31_250 * 512 * 16
    assert ccm.bytes_per_rank(2_000_000, 512, 64, sharded=False) == 2_000_000 * 512 * 16
    assert ccm.bytes_per_rank(93_431, 512, 8, sharded=True) == 11_679 * 512 * 16  # the larger shards
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "class_centre_memory.py")],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "| 2,000,000 | 15.259 | 15.259 | 15.259 | 15.259 | 1.907 | 0.238 |" in out
    table = (REPO / "benchmarks" / "RESULTS.md").read_text()
    assert ccm.table(ccm.DEFAULT_CLASSES, ccm.DEFAULT_RANKS, 512) in table  # RESULTS.md shows this script's output
