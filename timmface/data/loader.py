"""Training batches: deterministic, resumable sampling; uint8 batches; flip + normalise on the device.

Sampling is defined over *global* batches: epoch ``e`` shuffles the dataset with a generator
seeded by ``(seed, e)``; global batch ``j`` is ``perm[j*B : (j+1)*B]``; rank ``r`` of ``W`` takes
its contiguous ``B / W`` slice and splits it into ``grad_accum`` micro-batches. The samples of an
optimiser step therefore do not depend on the number of ranks or workers, a run resumes at the
exact batch, and a run may resume at a different world size.

Each sample also gets a random seed and a flip bit from the same generator. Workers seed the
augmentation RNG with the sample's seed, so augmentations are reproducible too. Batches travel
as ``uint8``; :func:`normalize_on_device` mirrors the flipped samples and maps them to [-1, 1].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from timmface.errors import ConfigError, CorruptRecordError, DataError

__all__ = [
    "Batch",
    "GlobalBatchSampler",
    "SampleDataset",
    "TrainLoader",
    "build_dataset",
    "normalize_on_device",
    "DeviceNormalizer",
    "build_train_loader",
]


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


def detect_format(path: str) -> str:
    if path.startswith("wds://") or path.endswith(".tar"):
        return "wds"
    p = Path(path)
    if (p / "train.rec").exists() or (p / "train.idx").exists():
        return "recordio"
    if p.is_dir():
        return "folder"
    raise DataError(f"{path}: data path not found (expected a RecordIO folder with train.rec/train.idx/property, "
                    "an image folder root/<identity>/<image>, or wds://<shards>)")


def build_dataset(path: str, fmt: str = "auto") -> Dataset:
    """The training dataset at ``path``: items ``(uint8 CHW RGB, int label)``."""
    if not path:
        raise ConfigError("data.path is empty: give a RecordIO folder, an image folder, or set data.demo.enabled=true")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "recordio":
        from timmface.data.recordio import RecordIODataset

        return RecordIODataset(path)
    if fmt == "folder":
        from timmface.data.folder import ImageFolderDataset

        if not Path(path).is_dir():
            raise DataError(f"{path}: image folder not found")
        return ImageFolderDataset(path)
    if fmt == "wds":
        raise ConfigError(f"{path}: WebDataset shards are read by the streaming loader (data.format=wds)")
    raise ConfigError(f"data.format: unknown format '{fmt}'")


def dataset_num_classes(ds: Any, configured: int = 0) -> int:
    n = int(getattr(ds, "num_classes", 0) or 0)
    if configured and n and configured < n:
        raise ConfigError(f"data.num_classes={configured} but the dataset has {n} classes")
    return configured or n


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


@dataclass
class EpochPlan:
    """The shuffled order of one epoch with each sample's augmentation seed and flip bit."""

    order: np.ndarray
    seeds: np.ndarray
    flips: np.ndarray


def epoch_plan(num_samples: int, seed: int, epoch: int, hflip: bool) -> EpochPlan:
    rng = np.random.default_rng([seed, epoch, 0x7F4A7C15])
    order = rng.permutation(num_samples)
    seeds = rng.integers(0, 2**62, size=num_samples, dtype=np.int64)
    flips = rng.random(num_samples) < 0.5 if hflip else np.zeros(num_samples, dtype=bool)
    return EpochPlan(order, seeds, flips)


class GlobalBatchSampler:
    """Yields this rank's micro-batches as lists of ``(index, seed, flip)``; see the module docstring."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        seed: int = 0,
        hflip: bool = True,
    ) -> None:
        if global_batch % (world_size * grad_accum):
            raise ConfigError(
                f"batch_size={global_batch} must be divisible by world_size x grad_accum = {world_size * grad_accum}"
            )
        self.batches_per_epoch = num_samples // global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(f"batch_size={global_batch} is larger than the dataset ({num_samples} samples)")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.seed, self.hflip = seed, hflip
        self.epoch, self.batch = 0, 0  # position of the next global batch
        self._plan: tuple[int, EpochPlan] | None = None

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.world_size * self.grad_accum)

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, epoch_plan(self.num_samples, self.seed, epoch, self.hflip))
        return self._plan[1]

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def global_batch_items(self, epoch: int, batch: int) -> list[tuple[int, int, bool]]:
        """All samples of one global batch (every rank, every micro-step), in order."""
        plan = self.plan(epoch)
        sl = slice(batch * self.global_batch, (batch + 1) * self.global_batch)
        return list(zip(plan.order[sl].tolist(), plan.seeds[sl].tolist(), plan.flips[sl].tolist()))

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        """Infinite: epoch after epoch. Each global batch yields ``grad_accum`` micro-batches."""
        while True:
            epoch, batch = self.epoch, self.batch
            items = self.global_batch_items(epoch, batch)
            per_rank = self.global_batch // self.world_size
            mine = items[self.rank * per_rank : (self.rank + 1) * per_rank]
            m = self.micro_batch
            for k in range(self.grad_accum):
                yield mine[k * m : (k + 1) * m]
            self.batch += 1
            if self.batch >= self.batches_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0

    def __len__(self) -> int:  # DataLoader asks; we are infinite in practice
        return self.batches_per_epoch * self.grad_accum


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------


class SampleDataset(Dataset):
    """Wraps a dataset: ``(index, seed, flip)`` -> augmented uint8 image; corrupt records become markers."""

    def __init__(self, base: Dataset, transform: Callable | None = None, image_size: int = 112) -> None:
        self.base, self.transform, self.image_size = base, transform, image_size

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int, bool]) -> tuple:
        index, seed, flip = item
        try:
            image, label = self.base[index]
        except CorruptRecordError as e:
            return ("bad", index, e.key if e.key is not None else index, str(e))
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = resize_uint8(image, self.image_size)
        if self.transform is not None:
            if get_worker_info() is None:  # main process: do not disturb the trainer's RNG
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image = self.transform(image)
            else:
                torch.manual_seed(seed)
                image = self.transform(image)
        return image, int(label), index, bool(flip)


def resize_uint8(image: Tensor, size: int) -> Tensor:
    out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class Batch:
    images: Tensor
    """uint8 ``N x 3 x H x W`` RGB (not yet flipped)."""
    labels: Tensor
    """int64 ``N``."""
    indices: Tensor
    """int64 ``N``: dataset indices (record order), e.g. for cached teacher embeddings."""
    flips: Tensor
    """bool ``N``: mirror these samples on the device."""
    bad: list[tuple[int, Any, str]] = field(default_factory=list)
    """Records that failed to decode: ``(index, key, message)``."""

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.indices, self.flips.pin_memory(), self.bad)


def collate(samples: list[tuple]) -> Batch:
    good = [s for s in samples if not (len(s) == 4 and isinstance(s[0], str))]
    bad = [(s[1], s[2], s[3]) for s in samples if len(s) == 4 and isinstance(s[0], str)]
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), empty, empty, empty.bool(), bad)
    return Batch(
        images=torch.stack([s[0] for s in good]),
        labels=torch.tensor([s[1] for s in good], dtype=torch.int64),
        indices=torch.tensor([s[2] for s in good], dtype=torch.int64),
        flips=torch.tensor([s[3] for s in good], dtype=torch.bool),
        bad=bad,
    )


# --------------------------------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------------------------------


def normalize_on_device(images: Tensor, flips: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``N x 3 x H x W`` -> float ``(x / 255 - 0.5) / 0.5`` with ``flips`` rows mirrored."""
    x = images.to(dtype)
    if flips is not None and flips.any():
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)
    return x.mul_(1.0 / 127.5).sub_(1.0)


class DeviceNormalizer:
    """Moves a :class:`Batch` to the device (non-blocking) and returns float images in [-1, 1]."""

    def __init__(self, device: torch.device, channels_last: bool = False) -> None:
        self.device, self.channels_last = device, channels_last

    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        images = batch.images.to(self.device, non_blocking=True)
        flips = batch.flips.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        x = normalize_on_device(images, flips)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels, flips


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------


class TrainLoader:
    """An infinite iterator of micro-batches that can save and restore its position."""

    def __init__(
        self,
        dataset: Dataset,
        sampler: GlobalBatchSampler,
        transform: Callable | None = None,
        num_workers: int = 4,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        image_size: int = 112,
    ) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.samples = SampleDataset(dataset, transform, image_size)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self._iter: Iterator[Batch] | None = None
        self._consumed_micro = 0  # micro-batches handed out since the last set_position

    def _make_iter(self) -> Iterator[Batch]:
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
        loader = DataLoader(
            self.samples,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            **kwargs,
        )
        return iter(loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            self._start = (self.sampler.epoch, self.sampler.batch)
            # creating the iterator draws a worker base seed from the global RNG; keep the trainer's
            # RNG untouched so that a resumed run continues exactly like an uninterrupted one
            with torch.random.fork_rng(devices=[]):
                self._iter = self._make_iter()
        self._consumed_micro += 1
        return next(self._iter)

    def state_dict(self) -> dict[str, int]:
        """Position of the next global batch to be *consumed* (workers may have read ahead)."""
        steps = self._consumed_micro // self.sampler.grad_accum
        epoch, batch = getattr(self, "_start", (self.sampler.epoch, self.sampler.batch))
        total = epoch * self.sampler.batches_per_epoch + batch + steps
        return {"epoch": total // self.sampler.batches_per_epoch, "batch": total % self.sampler.batches_per_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.sampler.set_position(int(state["epoch"]), int(state["batch"]))
        self._consumed_micro = 0
        self._start = (self.sampler.epoch, self.sampler.batch)

    def close(self) -> None:
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    @property
    def epoch_progress(self) -> float:
        s = self.state_dict()
        return s["epoch"] + s["batch"] / self.sampler.batches_per_epoch


def build_train_loader(
    dataset: Dataset,
    global_batch: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
    seed: int = 0,
    hflip: bool = True,
    transform: Callable | None = None,
    num_workers: int = 4,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
    image_size: int = 112,
) -> TrainLoader:
    n = len(dataset)  # type: ignore[arg-type]
    sampler = GlobalBatchSampler(n, global_batch, rank, world_size, grad_accum, seed, hflip)
    if num_workers > 0 and math.isfinite(n):
        num_workers = min(num_workers, max(1, n // max(1, sampler.micro_batch)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainLoader(dataset, sampler, transform, num_workers, pin_memory, prefetch_factor, image_size)
