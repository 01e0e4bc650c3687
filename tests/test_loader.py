"""Sampling, resumable position, device-side flip + normalise, deterministic augmentation."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from timmface.data.batch import normalize_on_device
from timmface.data.loader import GlobalBatchSampler, SampleDataset, build_train_loader, collate
from timmface.data.transforms import build_transform
from timmface.errors import CorruptRecordError


class ToyDataset(Dataset):
    """Image i is filled with a pattern derived from i; label i % 5; index 13 is corrupt."""

    def __init__(self, n: int = 40, bad: tuple[int, ...] = ()) -> None:
        self.n, self.bad = n, set(bad)
        self.num_classes = 5

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i in self.bad:
            raise CorruptRecordError(f"toy: record {i} is corrupt", key=i + 1)
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8), i % 5


def _flatten(sampler: GlobalBatchSampler, n_micro: int) -> list[list[int]]:
    it = iter(sampler)
    return [[idx for idx, _, _ in next(it)] for _ in range(n_micro)]


def test_global_batches_do_not_depend_on_world_size_or_accumulation():
    single = _flatten(GlobalBatchSampler(50, 8, seed=3), 6)  # 6 global batches
    for world, accum in [(2, 1), (2, 2), (4, 2), (1, 4)]:
        per_rank = [_flatten(GlobalBatchSampler(50, 8, r, world, accum, seed=3), 6 * accum) for r in range(world)]
        for step in range(6):
            merged = []
            for r in range(world):
                for k in range(accum):
                    merged += per_rank[r][step * accum + k]
            assert merged == single[step], (world, accum, step)


def test_epochs_are_permutations_and_differ():
    s = GlobalBatchSampler(32, 8, seed=0)
    batches = _flatten(s, 8)  # two epochs of four batches
    first, second = sum(batches[:4], []), sum(batches[4:], [])
    assert sorted(first) == list(range(32)) and sorted(second) == list(range(32))
    assert first != second


def test_device_normalisation_equals_cpu_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 5, 7), generator=g, dtype=torch.uint8)
    flips = torch.tensor([True, False, True, True, False, False])
    out = normalize_on_device(images, flips)
    ref = []
    for img, f in zip(images, flips):
        x = img.float() / 255.0
        if f:
            x = torch.flip(x, dims=[2])
        ref.append((x - 0.5) / 0.5)
    torch.testing.assert_close(out, torch.stack(ref), rtol=0, atol=1e-6)


def test_resume_position_gives_the_same_next_batches():
    ds = ToyDataset(40)
    a = build_train_loader(ds, 8, image_size=16, num_workers=0, seed=1, grad_accum=2)
    for _ in range(2 * 3):  # three optimiser steps of two micro-batches (crosses an epoch: 5 per epoch)
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(6)]
    b = build_train_loader(ds, 8, image_size=16, num_workers=0, seed=1, grad_accum=2)
    b.load_state_dict(state)
    got = [next(b) for _ in range(6)]
    for x, y in zip(expected, got):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.images, y.images) and torch.equal(x.flips, y.flips)


def test_state_counts_consumed_batches_not_prefetched_ones():
    ds = ToyDataset(40)
    loader = build_train_loader(ds, 8, image_size=16, num_workers=2, seed=0, prefetch_factor=2)
    for _ in range(7):
        next(loader)
    assert loader.state_dict() == {"epoch": 1, "batch": 2}  # 5 batches per epoch
    loader.close()


def test_augmentation_is_reproducible_across_worker_counts():
    ds = ToyDataset(40)
    aug = build_transform([{"name": "RandomAffine", "args": [20], "kwargs": {"translate": [0.2, 0.2]}}])
    runs = []
    for workers in (0, 2):
        loader = build_train_loader(ds, 8, image_size=16, num_workers=workers, seed=5, transform=aug)
        runs.append([next(loader) for _ in range(3)])
        loader.close()
    for x, y in zip(*runs):
        assert torch.equal(x.images, y.images)
    # and the augmentation did change the images
    raw = torch.stack([ds[int(i)][0] for i in runs[0][0].indices])
    assert not torch.equal(raw, runs[0][0].images)


def test_corrupt_records_are_skipped_and_reported():
    ds = SampleDataset(ToyDataset(20, bad=(13,)), image_size=16)
    batch = collate([ds[(i, 0, False)] for i in (12, 13, 14)])
    assert batch.labels.tolist() == [2, 4] and batch.indices.tolist() == [12, 14]
    assert len(batch.bad) == 1 and batch.bad[0][1] == 14 and "record 13" in batch.bad[0][2]
