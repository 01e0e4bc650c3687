"""The micro-batch: what it holds, how a data worker builds it, how it reaches the main process and the device.

Both training loaders (:mod:`timmface.data.loader` for map-style datasets, :mod:`timmface.data.wds` for
WebDataset shards) and the GPU decoder (:mod:`timmface.data.gpu_decode`) share this module; it imports
none of them.

* :class:`Batch`: ``uint8`` images (not yet flipped or normalised), labels, dataset indices, flip bits,
  the records that failed to decode, and, for ``data.decode=gpu``, the encoded bytes instead of pixels.
* :class:`BatchBuilder` (worker side): decodes, resizes and augments sample by sample straight into one
  ``N x H x W x 3`` buffer, in shared memory so that the trip to the main process copies nothing.
* :class:`Wire`: the batch as it crosses the process boundary (small fields as numpy arrays, pixels in
  shared memory or in a buffer the main process lent from a :class:`SlotPool`); ``Wire.to_batch``
  rebuilds the :class:`Batch` in the main process.
* :func:`normalize_on_device` / :class:`DeviceNormalizer` (device side): mirror the flipped samples and map
  to [-1, 1] after the copy, so a batch crosses to the GPU as ``uint8``.
* :func:`micro_batch_size`: the per-rank, per-micro-step batch both loaders cut.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from timmface.data.image import resize_uint8
from timmface.errors import ConfigError, CorruptRecordError, DataError

__all__ = [
    "Batch",
    "BatchBuilder",
    "DeviceNormalizer",
    "SlotPool",
    "Wire",
    "empty_batch",
    "micro_batch_size",
    "normalize_on_device",
    "pass_batch",
    "seed_cpu_rng",
]

# --------------------------------------------------------------------------------------------------
# The batch
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


def empty_batch(bad: list[tuple[int, Any, str]]) -> Batch:
    empty = torch.empty(0, dtype=torch.int64)
    return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), empty, empty, empty.bool(), bad)


def pass_batch(batch: Any) -> Any:
    """DataLoader ``collate_fn`` of the fast path: the workers already built the batch (errors travel in it)."""
    return batch


def micro_batch_size(global_batch: int, world_size: int, grad_accum: int) -> int:
    """The per-rank, per-micro-step batch of a global ``batch_size``, which must divide evenly."""
    if global_batch % (world_size * grad_accum):
        raise ConfigError(
            f"batch_size={global_batch} must be divisible by world_size x grad_accum = {world_size * grad_accum}"
        )
    return global_batch // (world_size * grad_accum)


# --------------------------------------------------------------------------------------------------
# Worker side: building a batch
# --------------------------------------------------------------------------------------------------


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

    def wire(self, pool: int = -1, lent: int | None = None) -> Wire:
        """The batch for the trip to the main process (``lent``: the lent buffer's number in ``pool``)."""
        w = Wire(
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


# --------------------------------------------------------------------------------------------------
# The trip to the main process: the wire format and the buffers lent to the workers
# --------------------------------------------------------------------------------------------------

_storage_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)
_POOLS: weakref.WeakValueDictionary[int, SlotPool] = weakref.WeakValueDictionary()
_POOL_IDS = itertools.count()


@dataclass
class Wire:
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


# --------------------------------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------------------------------


def normalize_on_device(
    images: Tensor,
    flips: Tensor | None,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
    any_flip: bool | None = None,
) -> Tensor:
    """uint8 ``N x 3 x H x W`` (any memory layout) -> float ``(x / 255 - 0.5) / 0.5`` in ``memory_format``,
    with ``flips`` rows mirrored. ``any_flip``: whether any row is mirrored, when the caller knows it from a
    host copy (reading ``flips`` on an accelerator would wait for the device; see :class:`DeviceNormalizer`).
    Unknown: asked on a CPU, assumed (a ``torch.where`` that may change nothing) on an accelerator."""
    x = images.to(dtype, memory_format=memory_format)
    if any_flip is None and flips is not None:
        any_flip = flips.device.type != "cpu" or bool(flips.any())
    if flips is not None and any_flip:
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)
    return x.mul_(1.0 / 127.5).sub_(1.0)


class DeviceNormalizer:
    """Moves a :class:`Batch` to the device (non-blocking) and returns float images in [-1, 1].

    On CUDA the copies are issued on a side stream and the normalisation waits for them on the compute
    stream (``wait_stream``; ``record_stream`` keeps the allocator from reusing the memory too early). The
    training step reads nothing back from the device, so the host runs ahead of it: the next batch's copy
    (from the pinned memory the DataLoader hands over) then overlaps the current step's kernels instead of
    queueing behind them on one stream. Whether a sample is mirrored at all is read from the batch's CPU
    flips, never from the device copy.
    """

    def __init__(self, device: torch.device, channels_last: bool = False) -> None:
        self.device, self.channels_last = device, channels_last
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _to_device(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        tensors = (batch.images, batch.flips, batch.labels)
        if self.stream is None:
            return tuple(t.to(self.device, non_blocking=True) for t in tensors)  # type: ignore[return-value]
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            moved = tuple(t.to(self.device, non_blocking=True) for t in tensors)
        compute.wait_stream(self.stream)
        for t in moved:
            t.record_stream(compute)
        return moved  # type: ignore[return-value]

    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        any_flip = batch.flips.device.type != "cpu" or bool(batch.flips.any())  # the host copy, when there is one
        images, flips, labels = self._to_device(batch)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return normalize_on_device(images, flips, memory_format=fmt, any_flip=any_flip), labels, flips
