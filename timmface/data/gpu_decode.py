"""Decode training batches on the GPU (``data.decode=gpu``), and choose between CPU and GPU (``auto``).

The data workers then only read: they ship each micro-batch's encoded JPEG bytes (one concatenated
uint8 tensor plus offsets), labels, indices, flip bits and augmentation seeds. In the main process a
thread (:class:`DecodeAhead`, a few batches ahead of the trainer, on its own CUDA stream) decodes each batch
with one ``torchvision.io.decode_jpeg(list, device="cuda")`` call (nvJPEG; the hardware decoder on A100 /
H100 / H200), resizes wrongly sized images on the device in one call per source size (counted, like the CPU
path) and stacks them; the trainer's thread then waits for that stream on the device, not on the host.
Augmentations, when there are any, run in the trainer's thread on the decoded GPU images, one sample at a
time under the sample's seed (:meth:`EncodedBatchDecoder.augment`).

Decisions:

* **Augmentations run on the GPU, per sample, in the trainer's thread.** torchvision's v2 transforms
  accept CUDA tensors and draw their random parameters from the global CPU generator, seeded per sample
  (inside a fork of the CPU and device RNGs, so the trainer's streams are untouched): the same parameters
  as the CPU path. They cannot move to the decoding thread, whose use of the global generators would
  interleave with the trainer's. A v2 transform given a batch draws *one* set of parameters for all of it,
  so there is no batched form that keeps per-sample augmentation; with augmentations, GPU decoding pays
  only when the per-sample calls cost less than the CPU workers' decoding -- ``data.decode=auto`` measures
  exactly that. An augmentation that fails on a CUDA tensor is refused at start-up (:func:`check_gpu_decode`).
* **Pixels differ from CPU decoding by nvJPEG's chroma upsampling.** Both decoders see the same samples in
  the same order with the same seeds, resize then augment as the CPU path does (tested with a CPU decoder
  substituted: the batches are bit-identical). What remains is the decoder: torchvision creates its nvJPEG
  handle with ``NVJPEG_FLAGS_DEFAULT``, so for 4:2:0 JPEGs (libjpeg's default, and how MXNet/OpenCV packed
  the InsightFace sets) each chroma sample is *replicated* over its 2x2 block, where libjpeg-turbo
  interpolates it ("fancy upsampling", a 3/4-1/4 triangle filter). That costs ~1 level on face crops,
  whose colour varies slowly, and several levels on colourful detail at the pixel scale: on the test
  suite's 16x16 images of per-pixel colour noise (sigma 12 per channel) emulating the two upsamplings gives
  5.5 levels over the set (6.8 on the colour images, 0 on the grey ones), the 5.3 first measured on an
  H200. IDCT and colour-conversion rounding add well under a level.
* **Bad records.** If the batched decode fails, images are decoded one by one; any that still fails,
  and any non-JPEG (PNG in an image folder), goes through the dataset's own CPU decoding in the main
  process: a corrupt record is then skipped and counted with the dataset's own message, exactly as on
  the CPU path, and an image nvJPEG cannot read but libjpeg can is used as decoded on the CPU.

With a CPU ``device`` the same code (thread included) decodes with libjpeg-turbo and must reproduce the
CPU path bit for bit: that is how the byte-shipping path is tested without a GPU.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from timmface.data.batch import Batch, Wire, empty_batch, seed_cpu_rng
from timmface.data.image import decode_image_bytes, decode_rgb
from timmface.errors import ConfigError, CorruptRecordError, DataError, TimmfaceError

__all__ = [
    "DecodeAhead",
    "EncodedBatchDecoder",
    "check_gpu_decode",
    "dataset_fallback",
    "probe_decode",
    "resolve_decode_device",
]

Fallback = Callable[[Batch, int], Tensor]
"""``(batch, position) -> uint8 3 x H x W`` CPU image of sample ``position``, or ``CorruptRecordError``."""


def resolve_decode_device(decode: str, device: torch.device) -> torch.device | None:
    """Where batches are decoded: ``None`` = in the data workers on the CPU (``data.decode=cpu``, and ``auto``
    without CUDA), else the training device (``gpu``, which needs CUDA; ``auto`` on CUDA, before
    :func:`probe_decode` decides)."""
    if decode == "cpu":
        return None
    if decode not in ("gpu", "auto"):
        raise ConfigError(f"data.decode: '{decode}' is not one of cpu, gpu, auto")
    if device.type != "cuda":
        if decode == "auto":
            return None
        raise ConfigError(f"data.decode=gpu needs a CUDA device, but this run uses {device}; use data.decode=cpu")
    return device


def check_gpu_decode(device: torch.device, transform: Callable | None = None, image_size: int = 112) -> None:
    """Fail at start-up, in one line, if nvJPEG or an augmentation does not work on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    probe = encode_jpeg(torch.full((3, image_size, image_size), 128, dtype=torch.uint8))
    try:
        decoded = decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)[0]
    except (RuntimeError, ValueError, TypeError) as e:
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


def _jpeg_starts(encoded: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """bool ``N``: chunk ``i`` (``encoded[offsets[i]:offsets[i + 1]]``) starts with a JPEG's SOI marker."""
    starts, lengths = offsets[:-1], np.diff(offsets)
    ok = lengths >= 3
    head = np.zeros((len(starts), 3), dtype=np.uint8)
    for j in range(3):
        head[ok, j] = encoded[starts[ok] + j]
    return ok & (head[:, 0] == 0xFF) & (head[:, 1] == 0xD8) & (head[:, 2] == 0xFF)


class EncodedBatchDecoder:
    """Encoded :class:`~timmface.data.batch.Batch` (from the workers) -> decoded batch on ``device``.

    The result has ``images`` uint8 ``N' x 3 x S x S`` on ``device`` (``N'`` = the samples that decoded),
    the matching CPU ``labels``/``indices``/``flips``/``seeds``, and ``bad`` extended by the records that
    failed. :meth:`decode` draws no random number (a thread may run it); :meth:`augment` does, under each
    sample's seed, in the thread that trains; calling the decoder does both.
    """

    def __init__(
        self, device: torch.device, image_size: int, transform: Callable | None = None, fallback: Fallback | None = None
    ) -> None:
        self.device, self.image_size, self.transform = torch.device(device), image_size, transform
        self.fallback = fallback

    def __call__(self, batch: Batch) -> Batch:
        return self.augment(self.decode(batch))

    # ------------------------------------------------------------------------------------------ decode

    def _decode_all(self, chunks: list[Tensor], jpeg: np.ndarray) -> list[Tensor | None]:
        """One image per chunk (``None`` where it failed or is not a JPEG), on the device."""
        out: list[Tensor | None] = [None] * len(chunks)
        jpegs = np.flatnonzero(jpeg).tolist()
        if not jpegs:
            return out
        if self.device.type != "cuda":  # the CPU stand-in for nvJPEG: libjpeg-turbo, the workers' decoder
            for i in jpegs:
                with contextlib.suppress(RuntimeError):
                    out[i] = decode_rgb(chunks[i]).to(self.device)
            return out
        from torchvision.io import ImageReadMode, decode_jpeg

        try:  # one batched nvJPEG call (torchvision >= 0.19 takes a list)
            decoded = decode_jpeg([chunks[i] for i in jpegs], mode=ImageReadMode.RGB, device=self.device)
            for i, img in zip(jpegs, decoded):
                out[i] = img
        except (RuntimeError, TypeError):  # one bad image fails the whole call: find it
            for i in jpegs:
                with contextlib.suppress(RuntimeError):
                    out[i] = decode_jpeg(chunks[i], mode=ImageReadMode.RGB, device=self.device)
        return out

    def decode(self, batch: Batch) -> Batch:
        """Decode, fall back to the dataset for what fails, resize what has another size (one interpolation per
        source size, the same per-image arithmetic as :func:`~timmface.data.image.resize_uint8`), stack."""
        if batch.encoded is None or batch.offsets is None:
            return batch
        encoded, offsets = batch.encoded, batch.offsets.numpy()
        chunks = list(torch.split(encoded, np.diff(offsets).tolist()))
        images = self._decode_all(chunks, _jpeg_starts(encoded.numpy(), offsets))
        bad = list(batch.bad)
        good: list[int] = []
        kept: list[Tensor] = []
        for pos, image in enumerate(images):
            if image is None:
                try:
                    image = self._fallback(batch, pos).to(self.device)
                except CorruptRecordError as e:
                    index = int(batch.indices[pos])
                    bad.append((index, e.key if e.key is not None else index, str(e)))
                    continue
            good.append(pos)
            kept.append(image)
        if not good:
            return empty_batch(bad)
        size = (self.image_size, self.image_size)
        resized = [i for i, x in enumerate(kept) if tuple(x.shape[-2:]) != size]
        resized_from = tuple(int(s) for s in kept[resized[0]].shape[-2:]) if resized else None
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i in resized:
            by_size.setdefault(tuple(kept[i].shape), []).append(i)
        for members in by_size.values():  # resize_uint8's arithmetic, one call for all images of a size
            x = torch.stack([kept[i] for i in members]).float()
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            for i, y in zip(members, x.round_().clamp_(0, 255).to(torch.uint8)):
                kept[i] = y
        keep = torch.tensor(good, dtype=torch.int64)
        seeds = batch.seeds[keep] if batch.seeds is not None else torch.zeros(len(good), dtype=torch.int64)
        return Batch(
            torch.stack(kept), batch.labels[keep], batch.indices[keep], batch.flips[keep], bad, len(resized),
            resized_from, seeds=seeds,  # type: ignore[arg-type]
        )  # fmt: skip

    def _fallback(self, batch: Batch, pos: int) -> Tensor:
        if self.fallback is not None:
            return self.fallback(batch, pos)
        a, b = int(batch.offsets[pos]), int(batch.offsets[pos + 1])  # type: ignore[index]
        key = batch.keys[pos] if batch.keys else int(batch.indices[pos])
        return decode_image_bytes(batch.encoded[a:b].numpy().tobytes(), key=key, source="encoded batch")  # type: ignore[index]

    # ----------------------------------------------------------------------------------------- augment

    def _rng(self) -> contextlib.AbstractContextManager:
        """Seeding per sample must not move the trainer's CPU or device RNG."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def augment(self, batch: Batch) -> Batch:
        """The augmentations, sample by sample, each under its seed (the CPU path's parameters)."""
        if self.transform is None or len(batch.labels) == 0:
            return batch
        seeds = batch.seeds.tolist() if batch.seeds is not None else [0] * len(batch.labels)
        out: list[Tensor] = []
        with self._rng():
            for image, seed in zip(batch.images, seeds):
                if self.device.type == "cuda":
                    torch.cuda.manual_seed(seed)  # a transform that draws on the GPU (inside the fork)
                seed_cpu_rng(seed)
                out.append(self.transform(image))
        try:
            stacked = torch.stack(out)
        except RuntimeError:
            sizes = sorted({tuple(x.shape) for x in out})
            raise DataError(f"data.augmentations: one batch holds images of several sizes {sizes[:3]}") from None
        return replace(batch, images=stacked)


# --------------------------------------------------------------------------------------------------
# Decoding ahead, in a thread
# --------------------------------------------------------------------------------------------------

_END = object()


class DecodeAhead:
    """Decode the batches of ``source`` (the DataLoader's iterator) up to ``depth`` ahead, in a thread.

    nvJPEG's host-side parsing and the decode call release the GIL, so the thread's work overlaps the
    trainer's. On CUDA it works on its own stream and hands each batch over with an event: :meth:`__next__`
    makes the current stream wait for it (on the device) and marks the images as used there, so the caching
    allocator does not reuse their memory too early. Batches come out in the source's order; an error met
    in the thread is raised by the :meth:`__next__` that reaches it; :meth:`augment` (random numbers) runs in
    the caller's thread. Taking a batch from ``source`` early does not move the loader's resume position,
    which counts the batches handed to the trainer.
    """

    def __init__(self, source: Iterator[Any], decoder: EncodedBatchDecoder, depth: int = 2) -> None:
        self.source, self.decoder = source, decoder
        self.cuda = decoder.device.type == "cuda"
        self.stream = torch.cuda.Stream(decoder.device) if self.cuda else None
        self._queue: queue.Queue[tuple[Any, Any]] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timmface-decode", daemon=True)
        self._thread.start()

    def _decode(self, item: Any) -> Batch:
        batch = item.to_batch() if isinstance(item, Wire) else item
        if batch.error is not None:
            return batch  # raised by the trainer's thread, in order
        if self.stream is None:
            return self.decoder.decode(batch)
        with torch.cuda.device(self.decoder.device), torch.cuda.stream(self.stream):
            return self.decoder.decode(batch)

    def _put(self, item: tuple[Any, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = next(self.source)
                except StopIteration:
                    self._put((_END, None))
                    return
                batch = self._decode(item)
                event = None
                if self.stream is not None:
                    event = torch.cuda.Event()
                    event.record(self.stream)
                if not self._put((batch, event)):
                    return
        except BaseException as e:  # handed to the trainer's thread, which raises it
            self._put((e, None))

    def __iter__(self) -> DecodeAhead:
        return self

    def __next__(self) -> Batch:
        item, event = self._queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch: Batch = item
        if event is not None:
            current = torch.cuda.current_stream(self.decoder.device)
            current.wait_event(event)
            if batch.images.is_cuda:
                batch.images.record_stream(current)
        if batch.error is not None:
            return batch
        return self.decoder.augment(batch)

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is reading), then the source's workers."""
        self._stop.set()
        while True:  # a thread waiting to hand over a batch sees the stop flag within 0.1 s
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=60)
        if hasattr(self.source, "_shutdown_workers"):
            self.source._shutdown_workers()


# --------------------------------------------------------------------------------------------------
# data.decode=auto
# --------------------------------------------------------------------------------------------------


def _rate(loader: Any, warmup: int, batches: int, device: torch.device | None) -> float:
    """Images per second the loader hands over, after ``warmup`` batches (worker start-up)."""
    try:
        for _ in range(warmup):
            next(loader)
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        t0, images = time.perf_counter(), 0
        for _ in range(batches):
            images += len(next(loader).labels)
        if cuda:
            torch.cuda.synchronize(device)  # the GPU path's decode finishes on the device
        return images / max(time.perf_counter() - t0, 1e-9)
    finally:
        loader.close()


def probe_decode(build: Callable[..., Any], device: torch.device, workers: int) -> tuple[torch.device | None, str]:
    """``data.decode=auto`` on CUDA: time the CPU-decoding and the GPU-decoding loader over the same batches
    and keep the faster. ``build(decode_device=..., prefetch_factor=...)`` makes a loader from the start.

    Each loader gets ``workers + 1`` untimed batches (every worker's first includes its start-up), then
    ``2 (workers + 1)`` timed ones with a prefetch depth of 1, so the timing is the steady rate and not a
    queue filled in advance. The loaders are closed; the caller builds the one to train with. Returns the
    decode device (``None`` = CPU) and the line that says what was measured and chosen. A resumed run probes
    again: it may choose the other decoder, whose pixels differ by the chroma upsampling (see above).
    """
    warmup, batches = workers + 1, 2 * (workers + 1)
    rates: dict[str, float] = {}
    notes = ""
    for name, target in (("cpu", None), ("gpu", device)):
        try:
            rates[name] = _rate(build(decode_device=target, prefetch_factor=1), warmup, batches, target)
        except TimmfaceError as e:  # e.g. nvJPEG missing: the CPU path decides
            rates[name], notes = 0.0, f" (GPU decoding failed: {e})"
    choice = "gpu" if rates["gpu"] > rates["cpu"] else "cpu"
    line = (
        f"data.decode=auto: CPU decode {rates['cpu']:,.0f} img/s ({workers} workers), GPU decode "
        f"{rates['gpu']:,.0f} img/s, over {batches} batches each{notes}: using {choice}"
    )
    return (device if choice == "gpu" else None), line
