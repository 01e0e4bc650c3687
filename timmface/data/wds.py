"""WebDataset tar shards: training data streamed from local disks or object storage.

``data.path=wds://path/to/shards-{000000..000009}.tar`` (brace ranges), a ``.tar`` glob
(``wds:///data/shards-*.tar``) or any URL that webdataset opens (``pipe:``, ``s3://`` via its
handlers). A sample is the tar members of one ``__key__``: the image as ``jpg`` (or ``jpeg``, ``png``,
``webp``) and the label as ``cls`` (decimal text), as in timm-face. Reading needs the ``wds`` extra
(``pip install timmface[wds]``); :func:`write_shards` writes shards with the standard library alone.

Next to the shards, ``meta.json`` (written by :func:`write_shards`) gives ``num_classes``, the number of
samples of every shard and whether keys are dataset indices; without it, ``classes.txt`` (one class
name per line) gives the number of classes, else set ``data.num_classes``.

Order, sharding and resume
--------------------------
Epoch ``e`` shuffles the shard list with a generator seeded by ``(seed, e)``, identical on every rank;
rank ``r`` of ``W`` takes shards ``r, r + W, ...`` of that order (the role of webdataset's
``nodesplitter``) and its data worker ``k`` of ``K`` takes every ``K``-th of those (``workersplitter``),
so ranks read disjoint shards that together cover the set. Each worker streams its shards through a
shuffle buffer and cuts micro-batches of ``batch_size / (W * grad_accum)``; its seeded generator also
draws every sample's augmentation seed and flip bit. An epoch is one pass over the rank's shards (a
worker drops its last incomplete micro-batch; those samples come back in later epochs); then the next
epoch starts. Ranks holding different numbers of samples reach their epoch ends at different steps.

The saved position is ``(epoch, micro-batches consumed in it)``. A resume replays that epoch's shard
order and shuffle buffers and skips the consumed batches inside the workers without decoding them
(their records are still read). The DataLoader takes batches from its workers in turn, skipping
workers that ran dry, so which worker produced the ``j``-th batch follows from the workers' batch
counts: with ``meta.json`` sample counts the resume is **exact** (same batches, pixels, seeds and
flips as an uninterrupted run with the same number of ranks and workers). Without counts it is exact
while every worker still had batches at the saved position; past that point (the end of an epoch
whose workers hold unequal shares) some batches of that epoch may be repeated or skipped. The trainer
checkpoints rank 0's position and every rank resumes from it: exact on all ranks when they get equal
numbers of batches per epoch (a shard count divisible by the number of ranks, equal shard sizes, as
:func:`write_shards` writes them but for the last shard); otherwise the other ranks resume at rank 0's
position in their own stream. With another number of ranks or workers the saved position means other
batches (the samples of the epoch are dealt differently): streaming cannot address samples the way
RecordIO can.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from timmface.data.batch import Batch, BatchBuilder, Wire, micro_batch_size, pass_batch
from timmface.data.image import decode_image_bytes, decode_rgb
from timmface.errors import ConfigError, CorruptRecordError, DataError
from timmface.fileio import atomic_write
from timmface.stopping import ignore_stop_signals

PREFIX = "wds://"
META = "meta.json"
CLASSES = "classes.txt"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
DEFAULT_SHUFFLE_BUFFER = 10_000  # samples per worker, as timm-face's `.shuffle(10_000)`

__all__ = ["WebDatasetShards", "WebDatasetLoader", "check_shard_pattern", "expand_shards", "shards_for", "write_shards"]


# --------------------------------------------------------------------------------------------- shard list


def _braceexpand(spec: str) -> list[str]:
    try:
        from braceexpand import braceexpand  # a dependency of webdataset
    except ImportError:
        if "{" in spec:
            raise ConfigError(f"{spec}: brace ranges need the wds extra (pip install timmface[wds])") from None
        return [spec]
    return list(braceexpand(spec))


def _is_url(path: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", path)) and not path.startswith("file:")


def expand_shards(path: str) -> list[str]:
    """The shard URLs of ``path``: ``wds://`` stripped, ``::``-separated lists and brace ranges expanded,
    local glob patterns (``*``, ``?``, ``[``) matched and sorted."""
    spec = path[len(PREFIX) :] if path.startswith(PREFIX) else path
    urls: list[str] = []
    for part in spec.split("::"):
        for url in _braceexpand(part):
            if not _is_url(url) and any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    if not urls:
        raise DataError(f"{path}: no WebDataset shards match")
    local_missing = [u for u in urls if not _is_url(u) and not Path(u.removeprefix("file:")).is_file()]
    if local_missing:
        raise DataError(f"{local_missing[0]}: shard not found ({len(local_missing)} of {len(urls)} missing)")
    return urls


def _read_beside(url: str, name: str) -> bytes | None:
    """A small file next to the shard ``url`` (local path or any URL webdataset opens), or None."""
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    target = f"{folder}/{name}"
    try:
        if not _is_url(target):
            p = Path(target.removeprefix("file:"))
            return p.read_bytes() if p.is_file() else None
        from webdataset.gopen import gopen

        with gopen(target, "rb") as f:
            return f.read()
    except Exception:  # remote metadata is optional: absent, no permission, no network
        return None


class WebDatasetShards:
    """What a run knows about a shard set before streaming it.

    Attributes:
        path: as given (``wds://...``).
        urls: the shards, in the order the pattern lists them.
        num_classes: from ``meta.json`` or ``classes.txt`` next to the first shard; 0 when neither says.
        counts: samples per shard (``urls`` order) from ``meta.json``, or None.
        index_keys: ``__key__`` is the sample's index in the source dataset (shards written by
            :func:`write_shards`): batches then carry those indices (cached teacher embeddings work).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.urls = expand_shards(path)
        meta: dict[str, Any] = {}
        raw = _read_beside(self.urls[0], META)
        if raw is not None:
            try:
                meta = json.loads(raw)
            except ValueError:
                raise DataError(f"{self.urls[0].rsplit('/', 1)[0]}/{META}: not valid JSON") from None
        self.num_classes = int(meta.get("num_classes") or 0)
        if not self.num_classes:
            names = _read_beside(self.urls[0], CLASSES)
            if names is not None:
                self.num_classes = sum(1 for line in names.decode("utf-8", "replace").splitlines() if line.strip())
        shard_counts = meta.get("shards") or {}
        counts = [shard_counts.get(os.path.basename(u)) for u in self.urls]
        self.counts: list[int] | None = [int(c) for c in counts] if counts and None not in counts else None
        self.index_keys = bool(meta.get("index_keys")) and self.counts is not None
        size = meta.get("image_size")
        self.image_size: tuple[int, int] | None = (int(size[0]), int(size[1])) if size else None

    def __len__(self) -> int:
        """Samples in all shards when ``meta.json`` counts them, else 0 (unknown until streamed)."""
        return sum(self.counts) if self.counts is not None else 0

    def __repr__(self) -> str:
        return f"WebDatasetShards({self.path!r}, shards={len(self.urls)}, num_classes={self.num_classes})"


def shards_for(urls: list[str], seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """Positions (in ``urls``) of rank ``rank``'s shards in epoch ``epoch``: the same shuffle on every
    rank, then every ``world_size``-th shard (webdataset's ``nodesplitter`` role, made deterministic)."""
    order = np.random.default_rng([seed, epoch, 0x5EED5]).permutation(len(urls))
    return order[rank::world_size].tolist()


def worker_skips(batches_per_worker: list[int], consumed: int) -> tuple[list[int], int]:
    """``(delivered, next)``: how many of its batches each worker had delivered when ``consumed`` batches
    were taken from the DataLoader, which asks its workers in turn and passes over those that ran dry;
    and the worker whose turn came next."""
    skips = [0] * len(batches_per_worker)
    k, taken = 0, 0
    while taken < consumed and any(s < n for s, n in zip(skips, batches_per_worker)):
        if skips[k] < batches_per_worker[k]:
            skips[k] += 1
            taken += 1
        k = (k + 1) % len(skips)
    return skips, k


# ------------------------------------------------------------------------------------------------ stream


def _shuffled(samples: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """A shuffle buffer: fill ``size`` samples, then emit a random one for every one that arrives."""
    buf: list[dict[str, Any]] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        k = rng.randrange(size)
        buf[k], sample = sample, buf[k]
        yield sample
    rng.shuffle(buf)
    yield from buf


def _read(urls: list[str], bases: list[int] | None) -> Iterator[dict[str, Any]]:
    """Samples of ``urls`` in order, each with ``__pos__`` (global position when ``bases`` is known)."""
    try:
        from webdataset.tariterators import tarfile_samples
    except ImportError:
        raise ConfigError("reading WebDataset shards needs the wds extra: pip install timmface[wds]") from None
    for j, url in enumerate(urls):
        try:
            for i, sample in enumerate(tarfile_samples([{"url": url}])):
                sample["__pos__"] = bases[j] + i if bases is not None else -1
                yield sample
        except (OSError, tarfile.TarError, ValueError) as e:
            first = " ".join(str(e).split())[:200]
            raise DataError(f"{url}: cannot read WebDataset shard ({first})") from None


class _ShardStream(IterableDataset):
    """One rank's epoch, run by each DataLoader worker on its share of the shards."""

    def __init__(self, loader: WebDatasetLoader, epoch: int, skips: list[int] | None, first: int = 0) -> None:
        self.shards, self.micro_batch = loader.shards, loader.micro_batch
        self.rank, self.world_size, self.seed = loader.rank, loader.world_size, loader.seed
        self.hflip, self.transform, self.image_size = loader.hflip, loader.transform, loader.image_size
        self.encoded, self.buffer, self.num_classes = loader.encoded, loader.shuffle_buffer, loader.num_classes
        self.epoch, self.skips, self.workers = epoch, skips, max(1, loader.num_workers)
        # a resumed epoch's DataLoader asks its worker 0 first: that worker plays the part of the worker
        # whose turn was next (``first``), and so on round the circle, so the order of turns continues
        self.first = first

    def worker_shards(self, worker: int) -> list[int]:
        mine = shards_for(self.shards.urls, self.seed, self.epoch, self.rank, self.world_size)
        return mine[worker :: self.workers]

    def __iter__(self) -> Iterator[Wire]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first) % self.workers
        streams = np.random.SeedSequence([self.seed, self.epoch, self.rank, worker, 0x57AE]).spawn(2)
        order_rng = random.Random(int(streams[0].generate_state(1)[0]))
        aug_rng = np.random.default_rng(streams[1])
        positions = self.worker_shards(worker)
        urls = [self.shards.urls[p] for p in positions]
        counts = self.shards.counts
        bases = None
        if counts is not None and not self.shards.index_keys:
            starts = np.concatenate([[0], np.cumsum(counts)])
            bases = [int(starts[p]) for p in positions]
        skip = self.skips[worker] if self.skips is not None else 0
        m = self.micro_batch
        pending: list[dict[str, Any]] = []
        try:
            for sample in _shuffled(_read(urls, bases), self.buffer, order_rng):
                pending.append(sample)
                if len(pending) < m:
                    continue
                seeds = aug_rng.integers(0, 2**62, size=m, dtype=np.int64).tolist()
                flips = (aug_rng.random(m) < 0.5 if self.hflip else np.zeros(m, dtype=bool)).tolist()
                batch, pending = pending, []
                if skip > 0:  # consumed before the resume: read (for the shuffle buffer), not decoded
                    skip -= 1
                    continue
                yield self._assemble(batch, seeds, flips, in_worker=info is not None)
        except DataError as e:
            if info is None:
                raise
            empty = np.empty(0, dtype=np.int64)
            yield Wire(0, empty, empty, empty.astype(bool), [], error=e)

    def _assemble(self, samples: list[dict[str, Any]], seeds: list[int], flips: list[bool], in_worker: bool) -> Wire:
        builder = BatchBuilder(len(samples), self.image_size, self.transform, shared=in_worker)
        fork = self.transform is not None and not self.encoded and not in_worker  # keep the trainer's RNG
        with torch.random.fork_rng(devices=[]) if fork else contextlib.nullcontext():
            for sample, seed, flip in zip(samples, seeds, flips):
                url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
                index = int(key) if self.shards.index_keys and str(key).isdigit() else int(sample["__pos__"])
                try:
                    data, label = _image_and_label(sample, url, key, self.num_classes)
                except CorruptRecordError as e:
                    builder.add_bad(index, e)
                    continue
                if self.encoded:
                    builder.add_encoded(data, label, index, seed, flip, key=(url, key))
                    continue
                try:
                    image = decode_rgb(data)
                except RuntimeError:
                    try:
                        image = _decode_or_raise(data, url, key)
                    except CorruptRecordError as e:
                        builder.add_bad(index, e)
                        continue
                builder.add(image, label, index, seed, flip)
        return builder.wire()


def _decode_or_raise(data: bytes, url: str, key: Any) -> Tensor:
    return decode_image_bytes(data, key=key, source=url)


def _image_and_label(sample: dict[str, Any], url: str, key: Any, num_classes: int) -> tuple[bytes, int]:
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise CorruptRecordError(f"{url}: key {key}: no image ({'/'.join(IMAGE_KEYS)}) in the sample", key=key)
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError):
        raise CorruptRecordError(f"{url}: key {key}: no integer label ('cls') in the sample", key=key) from None
    if not 0 <= label < num_classes:
        raise DataError(f"{url}: key {key} has label {label}, outside [0, {num_classes})")
    return data, label


def wds_fallback(batch: Batch, position: int) -> Tensor:
    """CPU decoding of a shipped sample the device could not decode; the error names shard and key."""
    a, b = int(batch.offsets[position]), int(batch.offsets[position + 1])  # type: ignore[index]
    url, key = batch.keys[position] if batch.keys else ("?", "?")  # type: ignore[index]
    return _decode_or_raise(batch.encoded[a:b].numpy().tobytes(), url, key)  # type: ignore[index]


# ------------------------------------------------------------------------------------------------ loader


class WebDatasetLoader:
    """An infinite iterator of :class:`~timmface.data.batch.Batch` micro-batches streamed from shards, with
    the position API of :class:`~timmface.data.loader.TrainLoader` (see the module docstring for what a
    resume guarantees)."""

    def __init__(
        self,
        shards: WebDatasetShards,
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
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        num_classes: int = 0,
    ) -> None:
        micro_batch = micro_batch_size(global_batch, world_size, grad_accum)
        n = len(shards.urls)
        if n < world_size:
            raise DataError(f"{shards.path}: {n} shards cannot feed {world_size} ranks; write smaller shards")
        if n % world_size and rank == 0:
            warnings.warn(
                f"{shards.path}: {n} shards over {world_size} ranks: some ranks read one shard more per epoch",
                stacklevel=2,
            )
        self.shards, self.rank, self.world_size, self.grad_accum = shards, rank, world_size, grad_accum
        self.micro_batch = micro_batch
        self.seed, self.hflip, self.transform, self.image_size = seed, hflip, transform, image_size
        # a worker without a shard would idle: never more workers than the rank's smallest shard share
        self.num_workers = min(num_workers, n // world_size)
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.num_classes = num_classes or shards.num_classes
        if self.num_classes < 1:
            raise ConfigError(f"{shards.path}: no {META} or {CLASSES} beside the shards; set data.num_classes")
        self.encoded = decode_device is not None
        self.decoder: Callable[[Batch], Batch] | None = None
        if decode_device is not None:
            from timmface.data.gpu_decode import EncodedBatchDecoder

            self.decoder = EncodedBatchDecoder(decode_device, image_size, transform, wds_fallback)
        self.epoch, self.batch = 0, 0  # the next micro-batch to hand out: epoch, and batches consumed in it
        self._iter: Iterator[Any] | None = None

    # -- epochs --------------------------------------------------------------------------------------

    def _batches_per_worker(self, epoch: int) -> list[int] | None:
        if self.shards.counts is None:
            return None
        stream = _ShardStream(self, epoch, None)
        return [
            sum(self.shards.counts[p] for p in stream.worker_shards(k)) // self.micro_batch
            for k in range(max(1, self.num_workers))
        ]

    def batches_per_epoch(self, epoch: int | None = None) -> int | None:
        """Micro-batches this rank gets in ``epoch`` (None without ``meta.json`` counts)."""
        per = self._batches_per_worker(self.epoch if epoch is None else epoch)
        return sum(per) if per is not None else None

    def _make_iter(self) -> Iterator[Any]:
        skips, first = None, 0
        if self.batch:
            per = self._batches_per_worker(self.epoch)
            workers = max(1, self.num_workers)
            # without counts: assume no worker ran dry before the saved position (see the module docstring)
            skips, first = worker_skips(per if per is not None else [2**62] * workers, self.batch)
        stream = _ShardStream(self, self.epoch, skips, first)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
            kwargs["worker_init_fn"] = ignore_stop_signals  # the trainer decides what a Ctrl-C or SIGTERM does
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=pass_batch,
            pin_memory=self.pin_memory and not self.encoded,
            **kwargs,
        )
        with torch.random.fork_rng(devices=[]):  # the worker base seed must not move the trainer's RNG
            return iter(loader)

    def __iter__(self) -> WebDatasetLoader:
        return self

    def __next__(self) -> Batch:
        for attempt in range(2):
            if self._iter is None:
                self._iter = self._make_iter()
            try:
                item = next(self._iter)
                break
            except StopIteration:  # the rank's shards are done: next epoch
                self.close()
                if attempt == 1 or self.batch == 0:
                    raise DataError(
                        f"{self.shards.path}: epoch {self.epoch} gave no batch of {self.micro_batch} samples "
                        f"(rank {self.rank} of {self.world_size}, {max(1, self.num_workers)} workers)"
                    ) from None
                self.epoch, self.batch = self.epoch + 1, 0
        self.batch += 1
        batch = item.to_batch() if isinstance(item, Wire) else item
        if batch.error is not None:
            raise batch.error
        return self.decoder(batch) if self.decoder is not None else batch

    # -- position --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "stream": 1}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        stream = bool(state.get("stream"))
        if not stream:
            warnings.warn("resuming a WebDataset stream from a RecordIO/folder position: epoch restarts", stacklevel=2)
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"]) if stream else 0

    def close(self) -> None:
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    @property
    def epoch_progress(self) -> float:
        per = self.batches_per_epoch()
        return self.epoch + (min(self.batch / per, 1.0) if per else 0.0)


# ------------------------------------------------------------------------------------------------ writer


def _extension(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise DataError("not a JPEG, PNG or WebP image")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same input, the same bytes
    tar.addfile(info, io.BytesIO(data))


# one printf conversion: %[flags][width][.precision][length]type (Python's own grammar, '%%' aside)
_PRINTF_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?([a-zA-Z%])")


def check_shard_pattern(pattern: str) -> str:
    """``pattern`` when it holds exactly one integer printf field (``%06d``) for the shard number, else ConfigError.

    ``%%`` is printf's literal percent sign, so ``faces-%%06d.tar`` has no field at all: every shard would get the
    same name (it is what ``--help`` texts show before argparse turns them into ``%``).
    """
    fields = [m.group(1) for m in _PRINTF_FIELD.finditer(pattern) if m.group(1) != "%"]
    if len(fields) != 1 or fields[0] not in "diuoxX":
        hint = " ('%%' is a literal percent sign)" if "%%" in pattern and not fields else ""
        raise ConfigError(
            f"{pattern}: the shard pattern needs exactly one integer printf field for the shard number{hint}, "
            "e.g. out/faces-%06d.tar"
        )
    try:
        pattern % 0
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{pattern}: not a usable shard pattern ({e}); e.g. out/faces-%06d.tar") from None
    return pattern


def write_shards(
    dataset: Any,
    out_pattern: str | os.PathLike,
    max_count: int = 10_000,
    shuffle: bool = True,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write ``dataset`` (anything with ``read_raw(i) -> (encoded bytes, label)`` and ``len``: RecordIO,
    image folders) as WebDataset shards; returns what ``meta.json`` holds.

    ``out_pattern`` names the shards with one printf field, e.g. ``out/shards-%06d.tar``. Each shard
    holds up to ``max_count`` samples ``{key}.jpg`` (or ``.png``/``.webp``, the bytes as stored: nothing
    is re-encoded) and ``{key}.cls``, where ``key`` is the 9-digit dataset index. With ``shuffle`` the
    samples are written in a seeded random order, so that shards mix identities (a RecordIO set is
    sorted by identity, and a shuffle buffer alone cannot mix a sorted stream). ``meta.json`` (sample
    counts, ``num_classes``, image size) and, for image folders, ``classes.txt`` go beside the shards.
    Shards are written to temporary names and renamed when complete.
    """
    pattern = check_shard_pattern(str(out_pattern))
    if not callable(getattr(dataset, "read_raw", None)):
        raise ConfigError(f"{type(dataset).__name__}: write_shards needs a dataset with read_raw(i)")
    n = len(dataset)
    order = np.random.default_rng([seed, 0x5A4D]).permutation(n) if shuffle else np.arange(n)
    folder = Path(pattern % 0).parent
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for shard, start in enumerate(range(0, n, max_count)):
        final = Path(pattern % shard)
        with (
            atomic_write(final, hidden=True) as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
        ):
            for i in order[start : start + max_count].tolist():
                data, label = dataset.read_raw(i)
                try:
                    ext = _extension(bytes(data[:12]))
                except DataError as e:
                    raise DataError(f"{getattr(dataset, 'root', '')}: item {i}: {e}") from None
                _add_member(tar, f"{i:09d}.{ext}", bytes(data))
                _add_member(tar, f"{i:09d}.cls", str(int(label)).encode())
        counts[final.name] = min(max_count, n - start)
        if progress is not None:
            progress(start + counts[final.name], n)
    size = getattr(dataset, "image_size", None)
    meta = {
        "format": "timmface-wds/1",
        "num_classes": int(getattr(dataset, "num_classes", 0) or 0),
        "num_samples": n,
        "image_size": list(size) if size else None,
        "index_keys": True,
        "shards": counts,
    }
    (folder / META).write_text(json.dumps(meta, indent=1) + "\n")
    classes = getattr(dataset, "classes", None)
    if classes:
        (folder / CLASSES).write_text("".join(f"{c}\n" for c in classes))
    return meta
