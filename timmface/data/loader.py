"""Training batches: deterministic, resumable sampling; uint8 batches; flip + normalise on the device.

Sampling is defined over *global* batches: epoch ``e`` shuffles the dataset with a generator
seeded by ``(seed, e)``; global batch ``j`` is ``perm[j*B : (j+1)*B]``; rank ``r`` of ``W`` takes
its contiguous ``B / W`` slice and splits it into ``grad_accum`` micro-batches. The samples of an
optimiser step therefore do not depend on the number of ranks or workers, a run resumes at the
exact batch, and a run may resume at a different world size.

Each sample also gets a random seed and a flip bit from the same generator. Workers seed the
augmentation RNG with the sample's seed, so augmentations are reproducible too. Batches travel
as ``uint8``; :func:`normalize_on_device` mirrors the flipped samples and maps them to [-1, 1].

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
import itertools
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from timmface.errors import ConfigError, CorruptRecordError, DataError, TimmfaceError

__all__ = [
    "Batch",
    "GlobalBatchSampler",
    "SampleDataset",
    "TrainLoader",
    "build_dataset",
    "decode_rgb",
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


def micro_batch_size(global_batch: int, world_size: int, grad_accum: int) -> int:
    """The per-rank, per-micro-step batch of a global ``batch_size``, which must divide evenly."""
    if global_batch % (world_size * grad_accum):
        raise ConfigError(
            f"batch_size={global_batch} must be divisible by world_size x grad_accum = {world_size * grad_accum}"
        )
    return global_batch // (world_size * grad_accum)


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
# Batches
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    images: Tensor
    """uint8 ``N x 3 x H x W`` RGB (not yet flipped). The fast path delivers it in channels-last memory,
    a view of ``N x H x W x 3``: libjpeg writes HWC, and a strided copy into CHW rows costs ~25 µs per
    112x112 image against ~8 µs for a plain one (measured here); :func:`normalize_on_device` gives the
    model the layout it wants. Empty (``0 x 3 x 0 x 0``) while the batch holds encoded bytes (``encoded``)."""
    labels: Tensor
    """int64 ``N``."""
    indices: Tensor
    """int64 ``N``: dataset indices (record order), e.g. for cached teacher embeddings (-1 when the source
    has no index, e.g. WebDataset shards without per-shard counts)."""
    flips: Tensor
    """bool ``N``: mirror these samples on the device."""
    bad: list[tuple[int, Any, str]] = field(default_factory=list)
    """Records that failed to decode: ``(index, key, message)``."""
    resized: int = 0
    """Samples of this batch that had another size and were resized to ``image_size``."""
    resized_from: tuple[int, int] | None = None
    """``(height, width)`` of the first resized sample."""
    encoded: Tensor | None = None
    """uint8: the encoded images of the ``N`` samples, concatenated (``data.decode=gpu``: workers ship bytes)."""
    offsets: Tensor | None = None
    """int64 ``N + 1``: sample ``i`` is ``encoded[offsets[i]:offsets[i + 1]]``."""
    seeds: Tensor | None = None
    """int64 ``N``: augmentation seeds, for augmenting after a main-process decode."""
    keys: list[Any] | None = None
    """Record keys of the shipped samples, where the source has no dataset to ask (WebDataset)."""
    error: Exception | None = None
    """A problem that must stop the run (e.g. ``train.idx`` disagreeing with ``train.rec``), raised in the
    main process: an exception raised inside a worker would reach the user wrapped in a traceback."""

    def pin_memory(self) -> Batch:
        pin = {name: getattr(self, name) for name in ("images", "labels", "flips")}
        pin = {k: v.pin_memory() if v.device.type == "cpu" and v.numel() else v for k, v in pin.items()}
        return Batch(
            pin["images"], pin["labels"], self.indices, pin["flips"], self.bad, self.resized, self.resized_from,
            self.encoded, self.offsets, self.seeds, self.keys, self.error,
        )  # fmt: skip


def _empty_batch(bad: list[tuple[int, Any, str]]) -> Batch:
    empty = torch.empty(0, dtype=torch.int64)
    return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), empty, empty, empty.bool(), bad)


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
        return _empty_batch(bad)
    return Batch(
        images=torch.stack([s[0] for s in good]),
        labels=torch.tensor([s[1] for s in good], dtype=torch.int64),
        indices=torch.tensor([s[2] for s in good], dtype=torch.int64),
        flips=torch.tensor([s[3] for s in good], dtype=torch.bool),
        bad=bad,
    )


def _pass(batch: Any) -> Any:
    """DataLoader ``collate_fn`` of the fast path: the workers already built the batch (errors travel in it)."""
    return batch


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------


_JPEG_SOI = b"\xff\xd8\xff"
_jpeg_op: tuple[Callable[..., Tensor] | None, int] | None = None


def _find_jpeg_op() -> tuple[Callable[..., Tensor] | None, int]:
    """torchvision's C++ JPEG decoder and its RGB mode, looked up once (importing torchvision.io is not
    cheap). The public ``decode_jpeg`` wraps the op with per-call API-usage logging and a
    DeprecationWarning: ~7 µs of a ~90 µs 112x112 decode (measured on this project's CPU)."""
    global _jpeg_op
    if _jpeg_op is None:
        from torchvision.io import ImageReadMode  # also registers the image ops

        try:
            _jpeg_op = (torch.ops.image.decode_jpeg, ImageReadMode.RGB.value)
        except (AttributeError, RuntimeError):  # a torchvision built without image ops
            _jpeg_op = (None, ImageReadMode.RGB.value)
    return _jpeg_op


def is_jpeg(data: bytes | bytearray | memoryview) -> bool:
    return bytes(data[:3]) == _JPEG_SOI


def decode_rgb(data: bytes | bytearray | memoryview | Tensor) -> Tensor:
    """Encoded image (bytes, or a uint8 CPU tensor) -> ``uint8`` RGB ``3 x H x W`` (for JPEGs a view of
    ``H x W x 3`` memory).

    The same pixels as :func:`timmface.data.recordio.decode_image_bytes` (``decode_image`` in RGB mode
    sends JPEGs to the same libjpeg-turbo call). Raises ``RuntimeError`` on bad bytes without composing
    a message: callers ask the dataset for its own error, which names the record.
    """
    if len(data) == 0:
        raise RuntimeError("empty image")
    if isinstance(data, Tensor):
        raw, head = data, bytes(data[:3].tolist())
    else:
        raw, head = torch.frombuffer(bytearray(data), dtype=torch.uint8), bytes(data[:3])
    op, rgb = _jpeg_op if _jpeg_op is not None else _find_jpeg_op()
    if op is not None and head == _JPEG_SOI:
        return op(raw, rgb, False)
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(raw, mode=ImageReadMode.RGB)


def resize_uint8(image: Tensor, size: int) -> Tensor:
    out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def _empty_uint8(shape: tuple[int, ...], shared: bool) -> Tensor:
    """``torch.empty(shape, uint8)``; with ``shared``, in shared memory from the start, as torch's
    ``default_collate`` does in workers (sending a private tensor to the main process copies it first)."""
    if shared:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    return torch.empty(shape, dtype=torch.uint8)


def seed_cpu_rng(seed: int) -> None:
    """Seed only the CPU generator (``torch.manual_seed`` would also reseed CUDA, i.e. the trainer's
    dropout stream when this runs in the main process). torchvision's v2 transforms draw their random
    parameters from it."""
    torch.default_generator.manual_seed(seed)


@dataclass
class _Wire:
    """A micro-batch on its way from a worker to the main process: the images sit in a buffer the main
    process lent (``slot``) or in fresh shared memory (``images``); the small fields travel as numpy
    arrays inside the pickle (each tensor would cost a shared-memory segment and a file-descriptor
    hand-over, ~0.35 ms, measured). :meth:`to_batch` makes the :class:`Batch` in the main process."""

    n: int
    labels: np.ndarray
    indices: np.ndarray
    flips: np.ndarray
    bad: list[tuple[int, Any, str]]
    resized: int = 0
    resized_from: tuple[int, int] | None = None
    pool: int = -1
    lent: int | None = None
    """The buffer the main process lent for this batch (given back here even when unused)."""
    in_lent: bool = False
    """The images are in the lent buffer (else in ``images``)."""
    images: Tensor | None = None
    encoded: bytes | None = None
    offsets: np.ndarray | None = None
    seeds: np.ndarray | None = None
    keys: list[Any] | None = None
    error: Exception | None = None

    def to_batch(self) -> Batch:
        pool = _POOLS.get(self.pool) if self.lent is not None else None
        if self.in_lent:
            if pool is None:  # the loader that lent the buffer was closed while this batch was on its way
                raise RuntimeError("a batch arrived after its loader was closed")
            images = pool.view(self.lent, self.n)  # type: ignore[arg-type]
        elif self.images is not None:
            images = self.images[: self.n].permute(0, 3, 1, 2)
        else:
            images = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        encoded = None
        if self.encoded is not None:
            encoded = torch.frombuffer(bytearray(self.encoded), dtype=torch.uint8) if self.encoded else None
            encoded = encoded if encoded is not None else torch.empty(0, dtype=torch.uint8)
        batch = Batch(
            images, torch.from_numpy(self.labels), torch.from_numpy(self.indices), torch.from_numpy(self.flips),
            self.bad, self.resized, self.resized_from, encoded,
            torch.from_numpy(self.offsets) if self.offsets is not None else None,
            torch.from_numpy(self.seeds) if self.seeds is not None else None, self.keys, self.error,
        )  # fmt: skip
        if pool is not None:  # from now on the batch's own tensors keep the buffer busy
            pool.handed_out(self.lent)  # type: ignore[arg-type]
        return batch

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread: the pinned copy frees the lent buffer at once."""
        return self.to_batch().pin_memory()


class BatchBuilder:
    """Assembles one micro-batch, sample by sample, into one ``N x H x W x 3`` uint8 buffer.

    ``add`` resizes a wrongly sized image (counted, see :attr:`Batch.resized`), applies the augmentation
    under the sample's seed (callers in the main process fork the RNG around the whole batch) and copies
    the result into its row; ``add_encoded`` keeps the bytes instead (``data.decode=gpu``). ``out`` is a
    buffer lent by the main process (used when its size fits), else one is allocated (in shared memory
    when ``shared``).
    """

    def __init__(
        self,
        capacity: int,
        image_size: int,
        transform: Callable | None = None,
        shared: bool = False,
        out: Tensor | None = None,
    ) -> None:
        self.capacity, self.image_size, self.transform, self.shared = capacity, image_size, transform, shared
        self._lent = out
        self._out: Tensor | None = None
        self._np_out: np.ndarray | None = None
        self.used_lent = False
        self.labels: list[int] = []
        self.indices: list[int] = []
        self.flips: list[bool] = []
        self.seeds: list[int] = []
        self.chunks: list[bytes] = []
        self.keys: list[Any] = []
        self.bad: list[tuple[int, Any, str]] = []
        self.resized = 0
        self.resized_from: tuple[int, int] | None = None

    def prepare(self, image: Tensor, seed: int) -> Tensor:
        """Resize (when needed), then augment under ``seed``: the reference path's per-sample steps."""
        if image.shape[-2:] != (self.image_size, self.image_size):
            if self.resized_from is None:
                self.resized_from = (int(image.shape[-2]), int(image.shape[-1]))
            self.resized += 1
            image = resize_uint8(image, self.image_size)
        if self.transform is not None:
            seed_cpu_rng(seed)
            image = self.transform(image)
        return image

    def _allocate(self, h: int, w: int) -> np.ndarray:
        lent = self._lent
        if lent is not None and lent.shape[0] >= self.capacity and tuple(lent.shape[1:]) == (h, w, 3):
            self._out, self.used_lent = lent, True
        else:  # sized by the first image: an augmentation may crop (the reference path stacks whatever comes)
            self._out = _empty_uint8((self.capacity, h, w, 3), self.shared)
        self._np_out = self._out.numpy()
        return self._np_out

    def add(self, image: Tensor, label: int, index: int, seed: int, flip: bool) -> None:
        """``image``: uint8 ``3 x h x w`` as decoded (any size)."""
        image = self.prepare(image, seed)
        out = self._np_out if self._np_out is not None else self._allocate(int(image.shape[-2]), int(image.shape[-1]))
        if image.shape != (3, *out.shape[1:3]):
            raise DataError(
                f"data.augmentations: sample {index} came out {tuple(image.shape)}, another size than the batch's "
                f"first (3, {out.shape[1]}, {out.shape[2]}); augmentations must give one size"
            )
        # numpy copies on this thread: torch's copy_ would fan a 37 kB copy out to the intra-op pool (in
        # the main process, with num_workers=0), which on a busy machine costs milliseconds per image
        out[len(self.labels)] = image.permute(1, 2, 0).numpy()
        self._record(label, index, seed, flip)

    def add_encoded(self, data: bytes, label: int, index: int, seed: int, flip: bool, key: Any = None) -> None:
        self.chunks.append(bytes(data))
        self.keys.append(key)
        self._record(label, index, seed, flip)

    def add_bad(self, index: int, error: CorruptRecordError) -> None:
        self.bad.append((index, error.key if error.key is not None else index, str(error)))

    def _record(self, label: int, index: int, seed: int, flip: bool) -> None:
        self.labels.append(int(label))
        self.indices.append(int(index))
        self.seeds.append(int(seed))
        self.flips.append(bool(flip))

    def wire(self, pool: int = -1, lent: int | None = None) -> _Wire:
        """The batch for the trip to the main process (``lent``: the lent buffer's number in ``pool``)."""
        w = _Wire(
            len(self.labels), np.asarray(self.labels, dtype=np.int64), np.asarray(self.indices, dtype=np.int64),
            np.asarray(self.flips, dtype=bool), self.bad, self.resized, self.resized_from, pool, lent,
        )  # fmt: skip
        if self.chunks:
            w.encoded = b"".join(self.chunks)
            w.offsets = np.cumsum([0] + [len(c) for c in self.chunks], dtype=np.int64)
            w.seeds = np.asarray(self.seeds, dtype=np.int64)
            w.keys = self.keys
        elif self._out is not None and self.labels:
            if self.used_lent:
                w.in_lent = True
            else:
                w.images = self._out
        return w

    def finish(self) -> Batch:
        return self.wire().to_batch()


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
    batch = _empty_batch([])
    batch.error = error
    return batch


# --------------------------------------------------------------------------------------------------
# Buffers lent to the workers
# --------------------------------------------------------------------------------------------------

_storage_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)
_POOLS: weakref.WeakValueDictionary[int, SlotPool] = weakref.WeakValueDictionary()
_POOL_IDS = itertools.count()


class SlotPool:
    """Shared-memory ``N x H x W x 3`` batch buffers that the main process lends to its workers.

    A fresh shared-memory buffer per batch costs its page faults (a 4.8 MB batch: ~3 ms here, as much as
    25 % of a worker's time); a lent buffer is faulted in once. A buffer is lent again only when it is
    neither on its way (lent, not yet handed out) nor referenced by any tensor still alive (the batch
    handed out, or a view of it: the storage's use count is back to the pool's own). When none is free,
    or torch lacks the use count, a worker allocates a fresh buffer, as before: never a wrong pixel.
    Created before the workers start, so they inherit (fork) or receive (spawn) the buffers once.
    """

    def __init__(self, count: int, capacity: int, image_size: int) -> None:
        self.buffers = [_empty_uint8((capacity, image_size, image_size, 3), shared=True) for _ in range(count)]
        self._base = [self._uses(b) for b in self.buffers]
        self._on_the_way: set[int] = set()
        self.id = next(_POOL_IDS)
        _POOLS[self.id] = self

    @staticmethod
    def _uses(buffer: Tensor) -> int:
        return _storage_use_count(buffer.untyped_storage()._cdata) if _storage_use_count is not None else -1

    def acquire(self) -> int | None:
        if _storage_use_count is None:
            return None
        for i, buffer in enumerate(self.buffers):
            if i not in self._on_the_way and self._uses(buffer) == self._base[i]:
                self._on_the_way.add(i)
                return i
        return None

    def view(self, slot: int, n: int) -> Tensor:
        return self.buffers[slot][:n].permute(0, 3, 1, 2)

    def handed_out(self, slot: int) -> None:
        self._on_the_way.discard(slot)  # from now on the batch's tensors keep the buffer busy

    def __getstate__(self) -> dict[str, Any]:  # spawn-started workers get the buffers, not the bookkeeping
        return {"buffers": self.buffers, "id": self.id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.buffers, self.id = state["buffers"], state["id"]
        self._base, self._on_the_way = [], set()


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
    """What the DataLoader's workers run: one :class:`_Task` -> one :class:`_Wire`."""

    def __init__(self, samples: SampleDataset, pool: SlotPool | None) -> None:
        self.samples, self.pool = samples, pool

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, task: _Task | Sequence[tuple[int, int, bool]]) -> _Wire:
        items, slot = (task.items, task.slot) if isinstance(task, _Task) else (list(task), None)
        lent = self.pool.buffers[slot] if self.pool is not None and slot is not None else None
        builder, error = self.samples.build(items, lent)
        pool = self.pool.id if self.pool is not None else -1
        if error is not None:
            empty = np.empty(0, dtype=np.int64)
            return _Wire(0, empty, empty, empty.astype(bool), [], pool=pool, lent=slot, error=error)
        return builder.wire(pool, slot)


# --------------------------------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------------------------------


def normalize_on_device(
    images: Tensor,
    flips: Tensor | None,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """uint8 ``N x 3 x H x W`` (any memory layout) -> float ``(x / 255 - 0.5) / 0.5`` in ``memory_format``,
    with ``flips`` rows mirrored."""
    x = images.to(dtype, memory_format=memory_format)
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
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return normalize_on_device(images, flips, memory_format=fmt), labels, flips


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
        self._iter: Iterator[Batch | _Wire] | None = None
        self._consumed_micro = 0  # micro-batches handed out since the last set_position

    def _make_iter(self) -> Iterator[Batch | _Wire]:
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
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
            collate_fn=collate if self.per_sample else _pass,
            # pinned only when a CUDA copy follows; encoded bytes need no pinning
            pin_memory=self.pin_memory and self.decoder is None,
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
        batch = next(self._iter)
        self._consumed_micro += 1
        if isinstance(batch, _Wire):
            batch = batch.to_batch()
        if batch.error is not None:
            raise batch.error
        return self.decoder(batch) if self.decoder is not None else batch

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
