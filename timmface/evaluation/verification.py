"""Pair verification (LFW, CFP-FP, AgeDB-30, ...) with insightface's protocol.

The protocol of insightface ``recognition/arcface_torch/eval/verification.py``:
embeddings are L2-normalised, the distance is the squared L2 distance, thresholds are
``arange(0, 4, 0.01)``, the pairs are split into 10 contiguous, unshuffled folds (sklearn
``KFold`` sizes: the first ``n % k`` folds hold one pair more); in each fold the threshold with the
best accuracy on the other nine folds (the smallest on ties, ``np.argmax``) is applied to the fold
("same" when ``distance < threshold``); the result is the mean and the population std (ddof 0) of
the ten fold accuracies. "Accuracy-Flip" sums the embeddings of each image and its mirror before
normalising.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timmface.errors import DataError

__all__ = [
    "THRESHOLDS",
    "kfold_indices",
    "verification_accuracy",
    "verification_metrics",
    "VerificationResult",
    "embed_uint8",
    "evaluate_bin",
]

THRESHOLDS = np.arange(0, 4, 0.01)


def kfold_indices(n: int, n_folds: int = 10) -> list[np.ndarray]:
    """Test indices of each fold of an unshuffled KFold: contiguous, first ``n % k`` folds one larger."""
    if n_folds < 2 or n < n_folds:
        raise ValueError(f"need at least {n_folds} pairs for {n_folds}-fold evaluation, got {n}")
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(n_folds)]


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _squared_distances(emb1: Any, emb2: Any) -> np.ndarray:
    e1 = _as_numpy(emb1).astype(np.float64)
    e2 = _as_numpy(emb2).astype(np.float64)
    if e1.shape != e2.shape or e1.ndim != 2:
        raise ValueError(f"embeddings must both be N x D, got {e1.shape} and {e2.shape}")
    e1 = e1 / np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-12)
    e2 = e2 / np.maximum(np.linalg.norm(e2, axis=1, keepdims=True), 1e-12)
    return np.square(e1 - e2).sum(1)


@dataclass
class VerificationResult:
    accuracy: float
    """Mean of the fold accuracies (a fraction)."""
    std: float
    """Population std (ddof 0) of the fold accuracies."""
    threshold: float
    """Mean of the per-fold best thresholds (squared L2 distance)."""
    fold_accuracies: list[float]
    fold_thresholds: list[float]


def verification_metrics(
    emb1: Any, emb2: Any, issame: Any, n_folds: int = 10, thresholds: np.ndarray = THRESHOLDS
) -> VerificationResult:
    """The full k-fold result for pairs ``(emb1[i], emb2[i])``; numpy or torch inputs."""
    dist = _squared_distances(emb1, emb2)
    same = _as_numpy(issame).astype(bool).reshape(-1)
    if same.shape[0] != dist.shape[0]:
        raise ValueError(f"{dist.shape[0]} pairs but {same.shape[0]} labels")
    # correct[t, i]: does threshold t classify pair i right?
    correct = (dist[None, :] < thresholds[:, None]) == same[None, :]
    fold_acc, fold_th = [], []
    all_idx = np.arange(dist.shape[0])
    for test in kfold_indices(dist.shape[0], n_folds):
        train = np.setdiff1d(all_idx, test, assume_unique=True)
        best = int(np.argmax(correct[:, train].mean(1)))  # argmax: the smallest threshold on ties
        fold_acc.append(float(correct[best, test].mean()))
        fold_th.append(float(thresholds[best]))
    return VerificationResult(
        accuracy=float(np.mean(fold_acc)),
        std=float(np.std(fold_acc)),
        threshold=float(np.mean(fold_th)),
        fold_accuracies=fold_acc,
        fold_thresholds=fold_th,
    )


def verification_accuracy(emb1: Any, emb2: Any, issame: Any, n_folds: int = 10) -> tuple[float, float]:
    """``(mean, std)`` of the k-fold verification accuracy, as fractions (insightface protocol)."""
    r = verification_metrics(emb1, emb2, issame, n_folds)
    return r.accuracy, r.std


# --------------------------------------------------------------------------------------------------
# Embedding images and evaluating .bin sets
# --------------------------------------------------------------------------------------------------


def to_model_input(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 RGB ``N x 3 x H x W`` -> float in [-1, 1] (the ``(x / 255 - 0.5) / 0.5`` convention)."""
    return images.to(dtype).div_(127.5).sub_(1.0)


@torch.no_grad()
def embed_uint8(
    model: nn.Module,
    images: Tensor,
    flip: bool = True,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Tensor:
    """Embeddings ``N x D`` (float32, not normalised) of uint8 images; with ``flip`` the sum of the
    embeddings of each image and its horizontal mirror."""
    device = next((p.device for p in model.parameters()), images.device)
    x = to_model_input(images.to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        emb = model(x).float()
        if flip:
            emb = emb + model(torch.flip(x, dims=[3])).float()
    return emb


def _decode_batches(images: Sequence[bytes], batch_size: int, size: int = 112) -> Iterator[Tensor]:
    from torchvision.io import ImageReadMode, decode_image

    for start in range(0, len(images), batch_size):
        batch = []
        for raw in images[start : start + batch_size]:
            img = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if img.shape[-2:] != (size, size):
                img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True)
                img = img[0].round().clamp(0, 255).to(torch.uint8)
            batch.append(img)
        yield torch.stack(batch)


def embed_pairs(
    model: nn.Module,
    images: Sequence[bytes],
    batch_size: int = 256,
    flip: bool = True,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    image_size: int = 112,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Embeddings (float32, CPU) of a list of JPEG/PNG byte strings (resized to ``image_size``), in order.
    ``progress(done, total)`` is called after every batch."""
    out = []
    for batch in _decode_batches(images, batch_size, image_size):
        out.append(embed_uint8(model, batch, flip=flip, amp_dtype=amp_dtype, channels_last=channels_last).cpu())
        if progress is not None:
            progress(sum(len(o) for o in out), len(images))
    return torch.cat(out) if out else torch.empty(0)


def evaluate_bin(
    model: nn.Module,
    path: str | Path,
    batch_size: int = 256,
    flip: bool = True,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    n_folds: int = 10,
    image_size: int = 112,
    progress: Callable[[int, int], None] | None = None,
) -> VerificationResult:
    """Verification accuracy of ``model`` (eval mode, float [-1,1] RGB input) on a ``.bin`` set whose
    images are resized to ``image_size`` when they differ (the published sets are all 112x112).
    ``progress(images embedded, images)`` is called after every batch."""
    from timmface.data.bin import read_bin

    images, issame = read_bin(path)
    if len(issame) < n_folds:
        raise DataError(f"{path}: holds {len(issame)} pairs; {n_folds}-fold evaluation needs at least {n_folds}")
    was_training = model.training
    model.eval()
    try:
        emb = embed_pairs(model, images, batch_size, flip, amp_dtype, channels_last, image_size, progress)
    finally:
        model.train(was_training)
    return verification_metrics(emb[0::2], emb[1::2], issame, n_folds)
