"""The insightface verification protocol: a hand-computed case and a naive re-implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from timmface.evaluation import kfold_indices, verification_accuracy, verification_metrics


def _pairs_with_distances(dists: list[float], scale_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2-D pairs whose squared L2 distance after normalisation is ``d`` (cos = 1 - d / 2)."""
    rng = np.random.default_rng(scale_seed)
    e1, e2 = [], []
    for d in dists:
        phi = np.arccos(1 - d / 2)
        base = rng.uniform(0, 2 * np.pi)
        e1.append(np.array([np.cos(base), np.sin(base)]) * rng.uniform(0.5, 30))
        e2.append(np.array([np.cos(base + phi), np.sin(base + phi)]) * rng.uniform(0.5, 30))
    return np.array(e1), np.array(e2)


def test_hand_computed_case():
    # 20 pairs = 10 folds of 2: pair 2k is "same" (distance 0.5), pair 2k+1 "different" (1.5),
    # except pair 0, a hard positive at distance 2.0.
    dists = [0.5 if i % 2 == 0 else 1.5 for i in range(20)]
    dists[0] = 2.0
    issame = [i % 2 == 0 for i in range(20)]
    e1, e2 = _pairs_with_distances(dists)
    result = verification_metrics(e1, e2, issame)
    # Every fold picks the smallest threshold above 0.5 (0.51): fold 0 then misses pair 0 (0.5),
    # the other nine folds are perfect -> mean 0.95, population std 0.15.
    assert result.fold_thresholds == pytest.approx([0.51] * 10)
    assert result.fold_accuracies == pytest.approx([0.5] + [1.0] * 9)
    assert result.accuracy == pytest.approx(0.95)
    assert result.std == pytest.approx(0.15)
    mean, std = verification_accuracy(torch.tensor(e1), torch.tensor(e2), torch.tensor(issame))
    assert (mean, std) == pytest.approx((0.95, 0.15))


def test_kfold_sizes_match_unshuffled_kfold():
    folds = kfold_indices(23, 10)
    assert [len(f) for f in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate(folds), np.arange(23))


def _naive(e1, e2, issame, n_folds=10):
    """A loop-by-loop version of insightface's calculate_roc accuracy path."""
    e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = ((e1 - e2) ** 2).sum(1)
    thresholds = np.arange(0, 4, 0.01)
    n = len(dist)
    fold_sizes = [n // n_folds + (1 if i < n % n_folds else 0) for i in range(n_folds)]
    start, accs = 0, []
    for size in fold_sizes:
        test = list(range(start, start + size))
        train = [i for i in range(n) if i not in test]
        start += size
        best_acc, best_t = -1.0, None
        for t in thresholds:
            acc = np.mean([(dist[i] < t) == issame[i] for i in train])
            if acc > best_acc:  # strict: the first (smallest) threshold wins ties
                best_acc, best_t = acc, t
        accs.append(np.mean([(dist[i] < best_t) == issame[i] for i in test]))
    return np.mean(accs), np.std(accs)


def test_matches_naive_implementation_on_random_pairs():
    rng = np.random.default_rng(3)
    n = 157
    issame = rng.random(n) < 0.5
    e1 = rng.normal(size=(n, 16))
    e2 = np.where(issame[:, None], e1 + rng.normal(scale=0.9, size=(n, 16)), rng.normal(size=(n, 16)))
    mean, std = verification_accuracy(e1, e2, issame)
    ref_mean, ref_std = _naive(e1, e2, issame)
    assert mean == pytest.approx(ref_mean, abs=1e-12)
    assert std == pytest.approx(ref_std, abs=1e-12)
    assert 0.6 < mean < 1.0  # a meaningful, non-trivial case
