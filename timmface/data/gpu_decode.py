"""Decode training batches on the GPU (``data.decode=gpu``).

The data workers then only read: they ship each micro-batch's encoded JPEG bytes (one concatenated
uint8 tensor plus offsets), labels, indices, flip bits and augmentation seeds. The main process
decodes the batch with one ``torchvision.io.decode_jpeg(list, device="cuda")`` call (nvJPEG), resizes
wrongly sized images on the device (counted, like the CPU path) and, when there are augmentations,
runs them on the decoded GPU images one sample at a time under the sample's seed.

Decisions:

* **Augmentations run on the GPU, per sample, in the main process.** torchvision's v2 transforms
  accept CUDA tensors and draw their random parameters from the CPU generator, which is seeded per
  sample (inside a fork of the CPU and device RNGs, so the trainer's streams are untouched): the same
  parameters as the CPU path. An augmentation that fails on a CUDA tensor is refused at start-up
  (:func:`check_gpu_decode`) with a message that points to ``data.decode=cpu``. Per-sample GPU
  augmentation costs main-process time; with heavy augmentation, CPU decode in the workers may be faster.
* **Pixels differ slightly from CPU decoding.** nvJPEG's IDCT and chroma upsampling are not
  libjpeg-turbo's; expect differences of a few grey levels. Everything else (samples, order, labels,
  flips, seeds, resume position) is the CPU path's.
* **Bad records.** If the batched decode fails, images are decoded one by one; any that still fails,
  and any non-JPEG (PNG in an image folder), goes through the dataset's own CPU decoding in the main
  process: a corrupt record is then skipped and counted with the dataset's own message, exactly as on
  the CPU path, and an image nvJPEG cannot read but libjpeg can is used as decoded on the CPU.

With a CPU ``device`` the same code decodes with libjpeg-turbo and must reproduce the CPU path bit
for bit: that is how the byte-shipping path is tested without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from timmface.data.batch import Batch, BatchBuilder, empty_batch
from timmface.data.image import decode_image_bytes, decode_rgb, is_jpeg
from timmface.errors import ConfigError, CorruptRecordError, DataError

Fallback = Callable[[Batch, int], Tensor]
"""``(batch, position) -> uint8 3 x H x W`` CPU image of sample ``position``, or ``CorruptRecordError``."""


def resolve_decode_device(decode: str, device: torch.device) -> torch.device | None:
    """Where batches are decoded: ``None`` = in the data workers on the CPU (``data.decode=cpu``), else
    the training device (``data.decode=gpu``, which needs CUDA)."""
    if decode == "cpu":
        return None
    if decode != "gpu":
        raise ConfigError(f"data.decode: '{decode}' is not one of cpu, gpu")
    if device.type != "cuda":
        raise ConfigError(f"data.decode=gpu needs a CUDA device, but this run uses {device}; use data.decode=cpu")
    return device


def check_gpu_decode(device: torch.device, transform: Callable | None = None, image_size: int = 112) -> None:
    """Fail at start-up, in one line, if nvJPEG or an augmentation does not work on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    probe = encode_jpeg(torch.full((3, image_size, image_size), 128, dtype=torch.uint8))
    try:
        decoded = decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)[0]
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(
            f"data.decode=gpu: torchvision cannot decode JPEGs on {device} ({first}); use data.decode=cpu"
        ) from None
    if transform is None:
        return
    try:
        out = transform(decoded)
    except Exception as e:  # any failure of a third-party transform on a CUDA tensor
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(
            f"data.augmentations: fail on {device} images ({type(e).__name__}: {first}); data.decode=gpu runs "
            "augmentations on the GPU: use data.decode=cpu"
        ) from None
    if not isinstance(out, Tensor) or out.dtype != torch.uint8:
        raise ConfigError("data.augmentations: the augmentations must map a uint8 CHW image to a uint8 CHW image")


def dataset_fallback(dataset: Any) -> Fallback:
    """The dataset decodes sample ``position`` itself (``dataset[index]``): its own error message."""

    def fallback(batch: Batch, position: int) -> Tensor:
        image, _ = dataset[int(batch.indices[position])]
        return image

    return fallback


class EncodedBatchDecoder:
    """Encoded :class:`~timmface.data.batch.Batch` (from the workers) -> decoded batch on ``device``.

    The result has ``images`` uint8 ``N' x 3 x H x W`` on ``device`` (``N'`` = the samples that decoded),
    the matching CPU ``labels``/``indices``/``flips``, and ``bad`` extended by the records that failed.
    """

    def __init__(
        self, device: torch.device, image_size: int, transform: Callable | None = None, fallback: Fallback | None = None
    ) -> None:
        self.device, self.image_size, self.transform = torch.device(device), image_size, transform
        self.fallback = fallback

    def _decode_all(self, chunks: list[Tensor]) -> list[Tensor | None]:
        """One image per chunk (``None`` where it failed), on the device."""
        out: list[Tensor | None] = [None] * len(chunks)
        jpegs = [i for i, c in enumerate(chunks) if c.numel() >= 3 and is_jpeg(bytes(c[:3].tolist()))]
        if self.device.type == "cuda" and jpegs:
            from torchvision.io import ImageReadMode, decode_jpeg

            try:
                decoded = decode_jpeg([chunks[i] for i in jpegs], mode=ImageReadMode.RGB, device=self.device)
                for i, img in zip(jpegs, decoded):
                    out[i] = img
            except RuntimeError:  # one bad image fails the whole call: find it
                for i in jpegs:
                    with contextlib.suppress(RuntimeError):
                        out[i] = decode_jpeg(chunks[i], mode=ImageReadMode.RGB, device=self.device)
        elif self.device.type != "cuda":
            for i in jpegs:
                with contextlib.suppress(RuntimeError):
                    out[i] = decode_rgb(chunks[i]).to(self.device)
        return out

    def _rng(self) -> contextlib.AbstractContextManager:
        """Seeding per sample must not move the trainer's CPU or device RNG."""
        if self.transform is None:
            return contextlib.nullcontext()
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def __call__(self, batch: Batch) -> Batch:
        if batch.encoded is None or batch.offsets is None:
            return batch
        offsets = batch.offsets.tolist()
        chunks = [batch.encoded[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        images = self._decode_all(chunks)
        seeds = batch.seeds.tolist() if batch.seeds is not None else [0] * len(chunks)
        builder = BatchBuilder(len(chunks), self.image_size, self.transform)
        builder.bad = list(batch.bad)
        good: list[int] = []
        prepared: list[Tensor] = []
        with self._rng():
            for pos, image in enumerate(images):
                index = int(batch.indices[pos])
                if image is None:
                    try:
                        image = self._fallback(batch, pos).to(self.device)
                    except CorruptRecordError as e:
                        builder.add_bad(index, e)
                        continue
                if self.transform is not None and self.device.type == "cuda":
                    torch.cuda.manual_seed(seeds[pos])  # a transform that draws on the GPU (inside the fork)
                prepared.append(builder.prepare(image, seeds[pos]))
                good.append(pos)
        if not good:
            return empty_batch(builder.bad)
        try:
            stacked = torch.stack(prepared)
        except RuntimeError:
            sizes = sorted({tuple(x.shape) for x in prepared})
            raise DataError(f"data.augmentations: one batch holds images of several sizes {sizes[:3]}") from None
        keep = torch.tensor(good, dtype=torch.int64)
        return Batch(
            stacked, batch.labels[keep], batch.indices[keep], batch.flips[keep], builder.bad, builder.resized,
            builder.resized_from,
        )  # fmt: skip

    def _fallback(self, batch: Batch, pos: int) -> Tensor:
        if self.fallback is not None:
            return self.fallback(batch, pos)
        a, b = int(batch.offsets[pos]), int(batch.offsets[pos + 1])  # type: ignore[index]
        key = batch.keys[pos] if batch.keys else int(batch.indices[pos])
        return decode_image_bytes(batch.encoded[a:b].numpy().tobytes(), key=key, source="encoded batch")  # type: ignore[index]
