"""The training loader for map-style datasets: deterministic, resumable sampling into uint8 micro-batches.

In this file, top to bottom: format dispatch (:func:`build_dataset`, :func:`dataset_num_classes`), sampling
(:class:`GlobalBatchSampler`), samples -> micro-batches (:class:`SampleDataset`, :func:`collate`), lending the
workers a buffer per batch, and :class:`TrainLoader` / :func:`build_train_loader`. The batch itself, how workers
build it and how it reaches the device live in :mod:`timmface.data.batch`; the decoders in
:mod:`timmface.data.image`; WebDataset shards stream through :mod:`timmface.data.wds` instead.

Sampling is defined over *global* batches: epoch ``e`` shuffles the dataset with a generator
seeded by ``(seed, e)``; global batch ``j`` is ``perm[j*B : (j+1)*B]``; rank ``r`` of ``W`` takes
its contiguous ``B / W`` slice and splits it into ``grad_accum`` micro-batches. The samples of an
optimiser step therefore do not depend on the number of ranks or workers, a run resumes at the
exact batch, and a run may resume at a different world size.

Each sample also gets a random seed and a flip bit from the same generator. Workers seed the
augmentation RNG with the sample's seed, so augmentations are reproducible too. Batches travel
as ``uint8``; :func:`~timmface.data.batch.normalize_on_device` mirrors the flipped samples and maps
them to [-1, 1].

Worker side, a whole micro-batch at a time (:meth:`SampleDataset.__getitems__`): read the encoded
bytes (``dataset.read_raw``), decode straight into one preallocated ``N x H x W x 3`` uint8 buffer
in shared memory (so handing it to the main process copies nothing), seed and augment only when
there are augmentations. The per-sample path (:meth:`SampleDataset.__getitem__` + :func:`collate`)
is the reference the fast path is tested against. With ``decode_device`` set (``data.decode=gpu``)
the workers ship the encoded bytes instead and :mod:`timmface.data.gpu_decode` decodes the batch
in the main process, on the device.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from timmface.data.batch import Batch, BatchBuilder, SlotPool, Wire, empty_batch, micro_batch_size, pass_batch
from timmface.data.image import decode_rgb, resize_uint8
from timmface.errors import ConfigError, CorruptRecordError, DataError, TimmfaceError
from timmface.stopping import ignore_stop_signals

__all__ = [
    "GlobalBatchSampler",
    "SampleDataset",
    "TrainLoader",
    "build_dataset",
    "build_train_loader",
    "collate",
    "dataset_num_classes",
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
    raise DataError(
        f"{path}: data path not found (expected a RecordIO folder with train.rec/train.idx/property, "
        "an image folder root/<identity>/<image>, or wds://<shards>)"
    )


def build_dataset(path: str, fmt: str = "auto") -> Any:
    """The training dataset at ``path``: items ``(uint8 CHW RGB, int label)``; for WebDataset shards a
    :class:`~timmface.data.wds.WebDatasetShards` description that :func:`build_train_loader` streams."""
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
        from timmface.data.wds import WebDatasetShards

        return WebDatasetShards(path)
    raise ConfigError(f"data.format: unknown format '{fmt}'")


def dataset_num_classes(ds: Any, configured: int = 0) -> int:
    """``data.num_classes`` when set (at least the dataset's own count), else the dataset's. A WebDataset
    shard set takes the configured count too: its stream checks every label against it."""
    from timmface.data.wds import WebDatasetShards

    n = int(getattr(ds, "num_classes", 0) or 0)
    if configured and n and configured < n:
        raise ConfigError(f"data.num_classes={configured} but the dataset has {n} classes")
    if isinstance(ds, WebDatasetShards):
        if not (configured or n):
            raise ConfigError(f"{ds.path}: no meta.json or classes.txt beside the shards; set data.num_classes")
        ds.num_classes = configured or n
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
        micro_batch_size(global_batch, world_size, grad_accum)  # (checks the divisibility)
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
# Samples -> micro-batches (in the data workers)
# --------------------------------------------------------------------------------------------------


def collate(samples: list[tuple] | Batch) -> Batch:
    """The reference collation of :meth:`SampleDataset.__getitem__` items; a :class:`Batch` that
    :meth:`SampleDataset.__getitems__` already assembled passes through (its error, if any, is raised)."""
    if isinstance(samples, Batch):
        if samples.error is not None:
            raise samples.error
        return samples
    good = [s for s in samples if not (len(s) == 4 and isinstance(s[0], str))]
    bad = [(s[1], s[2], s[3]) for s in samples if len(s) == 4 and isinstance(s[0], str)]
    if not good:
        return empty_batch(bad)
    return Batch(
        images=torch.stack([s[0] for s in good]),
        labels=torch.tensor([s[1] for s in good], dtype=torch.int64),
        indices=torch.tensor([s[2] for s in good], dtype=torch.int64),
        flips=torch.tensor([s[3] for s in good], dtype=torch.bool),
        bad=bad,
    )


def _fork_cpu_rng(needed: bool) -> contextlib.AbstractContextManager:
    """In the main process, keep the trainer's RNG untouched by per-sample seeding (one fork per batch)."""
    if needed and get_worker_info() is None:
        return torch.random.fork_rng(devices=[])
    return contextlib.nullcontext()


class SampleDataset(Dataset):
    """Wraps a dataset: ``(index, seed, flip)`` -> augmented uint8 image; corrupt records become markers.

    :meth:`__getitem__` is the per-sample reference; :meth:`__getitems__` (what a DataLoader calls with
    a whole micro-batch) is the fast path and returns a ready :class:`Batch`. It reads encoded bytes
    through ``base.read_raw(i) -> (bytes, label)`` when the dataset has it and no transform of its own
    (RecordIO, image folders), else ``base[i]``; with ``encoded`` it ships the bytes undecoded.
    """

    def __init__(
        self, base: Dataset, transform: Callable | None = None, image_size: int = 112, encoded: bool = False
    ) -> None:
        self.base, self.transform, self.image_size = base, transform, image_size
        self.raw = callable(getattr(base, "read_raw", None)) and getattr(base, "transform", None) is None
        if encoded and not self.raw:
            raise ConfigError(
                f"data.decode=gpu: {type(base).__name__} does not give encoded bytes (read_raw without a "
                "dataset transform); use data.decode=cpu"
            )
        self.encoded = encoded

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

    def __getitems__(self, items: Sequence[tuple[int, int, bool]]) -> Batch:
        """One micro-batch: ``items`` from :class:`GlobalBatchSampler`; the same batch as
        ``collate([self[i] for i in items])``, in one buffer (see :class:`BatchBuilder`)."""
        builder, error = self.build(items)
        return _with_error(error) if error is not None else builder.finish()

    def build(self, items: Sequence[tuple[int, int, bool]], out: Tensor | None = None) -> tuple[BatchBuilder, Any]:
        """Read, decode and augment ``items`` into a :class:`BatchBuilder` (``out``: a lent buffer). Returns
        ``(builder, error)``: in a worker a problem that must stop the run comes back as ``error``."""
        in_worker = get_worker_info() is not None
        builder = BatchBuilder(len(items), self.image_size, self.transform, shared=in_worker, out=out)
        try:
            with _fork_cpu_rng(self.transform is not None and not self.encoded):
                for index, seed, flip in items:
                    self._add(builder, int(index), seed, flip)
        except TimmfaceError as e:
            if not in_worker:
                raise
            return builder, e
        return builder, None

    def _add(self, builder: BatchBuilder, index: int, seed: int, flip: bool) -> None:
        if self.raw:
            try:
                data, label = self.base.read_raw(index)  # type: ignore[attr-defined]
            except CorruptRecordError as e:
                builder.add_bad(index, e)
                return
            if self.encoded:
                builder.add_encoded(data, label, index, seed, flip)
                return
            try:
                image = decode_rgb(data)
            except RuntimeError:  # ask the dataset: its error names the record (or it can decode it after all)
                image = None
            if image is not None:
                builder.add(image, label, index, seed, flip)
                return
        try:
            image, label = self.base[index]
        except CorruptRecordError as e:
            builder.add_bad(index, e)
            return
        builder.add(image, label, index, seed, flip)


def _with_error(error: Exception) -> Batch:
    batch = empty_batch([])
    batch.error = error
    return batch


# --------------------------------------------------------------------------------------------------
# Lending the workers a buffer with every micro-batch (see batch.SlotPool)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Task:
    """What the main process sends a worker: the micro-batch's items and the buffer lent for it."""

    items: list[tuple[int, int, bool]]
    slot: int | None


class _LendingSampler:
    """Wraps :class:`GlobalBatchSampler` and lends a buffer with every micro-batch (main process)."""

    def __init__(self, sampler: GlobalBatchSampler, pool: SlotPool) -> None:
        self.sampler, self.pool = sampler, pool

    def __iter__(self) -> Iterator[_Task]:
        for items in self.sampler:
            yield _Task(items, self.pool.acquire())

    def __len__(self) -> int:
        return len(self.sampler)


class _WorkerSide(Dataset):
    """What the DataLoader's workers run: one :class:`_Task` -> one :class:`Wire`."""

    def __init__(self, samples: SampleDataset, pool: SlotPool | None) -> None:
        self.samples, self.pool = samples, pool

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, task: _Task | Sequence[tuple[int, int, bool]]) -> Wire:
        items, slot = (task.items, task.slot) if isinstance(task, _Task) else (list(task), None)
        lent = self.pool.buffers[slot] if self.pool is not None and slot is not None else None
        builder, error = self.samples.build(items, lent)
        pool = self.pool.id if self.pool is not None else -1
        if error is not None:
            empty = np.empty(0, dtype=np.int64)
            return Wire(0, empty, empty, empty.astype(bool), [], pool=pool, lent=slot, error=error)
        return builder.wire(pool, slot)


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------


class _PerSample(Dataset):
    """The reference path: hides :meth:`SampleDataset.__getitems__`, so the DataLoader fetches sample by
    sample and collates with :func:`collate` (tests and benchmarks compare the fast path with it)."""

    def __init__(self, samples: SampleDataset) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int, bool]) -> tuple:
        return self.samples[item]


class TrainLoader:
    """An infinite iterator of micro-batches that can save and restore its position.

    ``decode_device``: workers ship encoded bytes and the batch is decoded here, on that device
    (``data.decode=gpu``, see :mod:`timmface.data.gpu_decode`; a CPU device gives the CPU path's pixels,
    which is how CI checks the byte-shipping path). ``per_sample``: the reference per-sample path.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: GlobalBatchSampler,
        transform: Callable | None = None,
        num_workers: int = 4,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        image_size: int = 112,
        *,
        decode_device: torch.device | None = None,
        per_sample: bool = False,
    ) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.samples = SampleDataset(dataset, transform, image_size, encoded=decode_device is not None)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.per_sample = per_sample
        self.decoder: Callable[[Batch], Batch] | None = None
        if decode_device is not None:
            from timmface.data.gpu_decode import EncodedBatchDecoder, dataset_fallback

            self.decoder = EncodedBatchDecoder(decode_device, image_size, transform, dataset_fallback(dataset))
        self.pool: SlotPool | None = None
        self._iter: Iterator[Batch | Wire] | None = None
        self._consumed_micro = 0  # micro-batches handed out since the last set_position

    def _make_iter(self) -> Iterator[Batch | Wire]:
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
            kwargs["worker_init_fn"] = ignore_stop_signals  # the trainer decides what a Ctrl-C or SIGTERM does
        dataset: Dataset
        sampler: Any = self.sampler
        if self.per_sample:
            dataset = _PerSample(self.samples)
        else:
            pool = self.pool = None
            if self.num_workers > 0 and self.decoder is None:
                # every prefetched batch, the one being consumed and two the trainer may still hold
                count = self.num_workers * self.prefetch_factor + 3
                pool = self.pool = SlotPool(count, self.sampler.micro_batch, self.samples.image_size)
                sampler = _LendingSampler(self.sampler, pool)
            dataset = _WorkerSide(self.samples, pool)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate if self.per_sample else pass_batch,
            # pinned only when a CUDA copy follows; encoded bytes need no pinning
            pin_memory=self.pin_memory and self.decoder is None,
            **kwargs,
        )
        if self.decoder is not None:  # decoded by a thread, a few batches ahead (its own CUDA stream)
            from timmface.data.gpu_decode import DecodeAhead

            return DecodeAhead(iter(loader), self.decoder)
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
        batch = next(self._iter)
        self._consumed_micro += 1
        if isinstance(batch, Wire):
            batch = batch.to_batch()
        if batch.error is not None:
            raise batch.error
        return batch

    def state_dict(self) -> dict[str, int]:
        """Position of the next global batch to be *consumed* (workers and the decoding thread read ahead)."""
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
        if it is not None and hasattr(it, "close"):  # DecodeAhead: its thread, then the workers
            it.close()
        elif it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    @property
    def epoch_progress(self) -> float:
        s = self.state_dict()
        return s["epoch"] + s["batch"] / self.sampler.batches_per_epoch


def build_train_loader(
    dataset: Any,
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
    decode_device: torch.device | None = None,
    per_sample: bool = False,
) -> Any:
    """The training loader of ``dataset``: a :class:`TrainLoader` over a map-style dataset, or the
    streaming :class:`~timmface.data.wds.WebDatasetLoader` for WebDataset shards. Both yield
    :class:`Batch` micro-batches and save/restore their position."""
    from timmface.data.wds import WebDatasetShards

    if isinstance(dataset, WebDatasetShards):
        from timmface.data.wds import WebDatasetLoader

        if per_sample:
            raise ConfigError("WebDataset shards have no per-sample reference path")
        return WebDatasetLoader(
            dataset, global_batch, rank=rank, world_size=world_size, grad_accum=grad_accum, seed=seed, hflip=hflip,
            transform=transform, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
            image_size=image_size, decode_device=decode_device,
        )  # fmt: skip
    n = len(dataset)
    sampler = GlobalBatchSampler(n, global_batch, rank, world_size, grad_accum, seed, hflip)
    if num_workers > 0 and math.isfinite(n):
        num_workers = min(num_workers, max(1, n // max(1, sampler.micro_batch)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainLoader(
            dataset, sampler, transform, num_workers, pin_memory, prefetch_factor, image_size,
            decode_device=decode_device, per_sample=per_sample,
        )  # fmt: skip
