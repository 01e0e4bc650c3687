"""Embeddings of a whole dataset in one memory-mappable file: the teacher-embedding cache, and resumable embedding.

File layout (``.tfemb``; version 1)::

    bytes 0-7      magic b"TFEMBED1"
    bytes 8-15     H, little-endian uint64
    next H bytes   UTF-8 JSON header, padded with spaces so the data starts at a multiple of 4096
    data_offset    C-order array (N, V, D) of ``dtype`` (float16 for a teacher cache; V = 2 views:
                   0 = the image, 1 = its horizontal mirror)
    done_offset    uint8 array (N,): 1 = row i was written

Record ``i`` is dataset index ``i`` (the order of ``dataset.keys``). The image given to the model is exactly what
the student is trained on before flip and normalisation: ``dataset[i]`` (uint8 CHW RGB), resized with
:func:`~timmface.data.loader.resize_uint8` when it is not ``image_size``, mapped to [-1, 1] by
:func:`~timmface.data.loader.normalize_on_device`; the mirrored view is ``torch.flip(x, dims=[3])`` of that.

Writing is crash-safe: the file is allocated under a temporary name and renamed, then each batch's rows are written
and synced *before* their ``done`` bytes, so a killed run loses at most the batches in flight and a re-run fills only
the rows whose ``done`` byte is 0. Records that fail to decode keep ``done = 0``; the cache stays usable and
:meth:`EmbeddingCache.lookup` names a missing record if one is ever asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from timmface.data.loader import normalize_on_device, resize_uint8
from timmface.errors import CorruptRecordError, DataError

__all__ = [
    "MAGIC",
    "FORMAT",
    "VERSION",
    "CACHE_VIEWS",
    "EmbeddingCache",
    "FillReport",
    "FileListDataset",
    "build_cache",
    "dataset_fingerprint",
    "embed_batch",
    "embed_to_file",
    "fill_embeddings",
    "read_embeddings",
    "write_embeddings",
]

MAGIC = b"TFEMBED1"
FORMAT = "timmface-embeddings"
VERSION = 1
ALIGN = 4096  # data starts on a page boundary, so the memory map of the rows is page-aligned
CACHE_VIEWS = ("original", "hflip")
SUM_VIEW = "original+hflip"  # one view: f(x) + f(flip(x)), insightface's Accuracy-Flip feature
_DTYPES = {"float16": np.float16, "float32": np.float32}
_REBUILD = "timmface embed --model TEACHER --data DATASET --out {path} --cache --overwrite"


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def _hash_file(path: Path, digest: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def dataset_fingerprint(dataset: Any) -> str:
    """A stable 16-hex-digit digest of what a dataset holds, independent of where it lives and of file times.

    RecordIO: the bytes of ``train.idx``, the size of ``train.rec``, the number of records and of classes. An image
    folder (or a list of image files): the sorted relative paths, each file's size, and the number of classes. Any
    other dataset with ``keys``: the keys and the number of classes.
    """
    digest = hashlib.sha256()
    n_classes = int(getattr(dataset, "num_classes", 0) or 0)
    idx_path = getattr(dataset, "idx_path", None)
    rec_path = getattr(dataset, "rec_path", None)
    if idx_path is not None and rec_path is not None:
        digest.update(b"recordio\0")
        _hash_file(Path(idx_path), digest)
        digest.update(struct.pack("<QQQ", Path(rec_path).stat().st_size, len(dataset), n_classes))
        return digest.hexdigest()[:16]
    keys = getattr(dataset, "keys", None)
    if keys is None:
        raise DataError(f"{dataset!r}: cannot fingerprint a dataset without 'keys'")
    root = getattr(dataset, "root", None)
    files = getattr(dataset, "files", None)  # FileListDataset: the resolved path of every key
    digest.update(b"files\0" if root is not None or files is not None else b"keys\0")
    rows = []
    for i, key in enumerate(keys):
        path = Path(files[i]) if files is not None else (Path(root) / str(key) if root is not None else None)
        size = path.stat().st_size if path is not None and path.is_file() else -1
        rows.append((str(key), size))
    for key, size in sorted(rows):
        digest.update(key.encode("utf-8", "surrogateescape") + b"\0" + str(size).encode() + b"\n")
    digest.update(struct.pack("<QQ", len(rows), n_classes))
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------


def _header_bytes(meta: dict[str, Any], row_bytes: int, n: int) -> tuple[bytes, dict[str, Any]]:
    """Serialise ``meta`` with ``data_offset``/``done_offset`` filled in; the JSON is padded to the alignment."""
    meta = dict(meta)
    size = ALIGN
    while True:
        meta["data_offset"] = size
        meta["done_offset"] = size + n * row_bytes
        text = json.dumps(meta, default=str, ensure_ascii=False).encode("utf-8")
        if 16 + len(text) <= size:
            return MAGIC + struct.pack("<Q", size - 16) + text + b" " * (size - 16 - len(text)), meta
        size += ALIGN  # the offsets' digits changed the length: take one more page and serialise again


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise DataError(f"{path}: not a timmface embedding file (no {MAGIC.decode()} magic)")
            (length,) = struct.unpack("<Q", head[8:])
            if length > 1 << 30:
                raise DataError(f"{path}: corrupt embedding file (header length {length})")
            # compared with the file before reading: read(n) allocates n bytes up front
            if length > os.fstat(f.fileno()).st_size - 16:
                raise DataError(f"{path}: truncated embedding file (header cut short)")
            text = f.read(length)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if len(text) < length:
        raise DataError(f"{path}: truncated embedding file (header cut short)")
    try:
        meta = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):  # json recurses per nesting level: "[[[[..." overflows (found by fuzzing)
        raise DataError(f"{path}: corrupt embedding file (header is not JSON)") from None
    if not isinstance(meta, dict):  # (checked alone: a list has no .get for the message below)
        raise DataError(f"{path}: not a timmface embedding file (header is a JSON {type(meta).__name__})")
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a timmface embedding file (format {_shown(meta.get('format'))})")
    if meta.get("version") != VERSION:
        raise DataError(
            f"{path}: embedding file version {_shown(meta.get('version'))} is not supported (expected {VERSION})"
        )
    if not isinstance(meta.get("dtype"), str) or meta["dtype"] not in _DTYPES:  # (a list is unhashable)
        raise DataError(f"{path}: unsupported dtype {_shown(meta.get('dtype'))}")
    for key in ("num_records", "dim", "views", "data_offset", "done_offset"):
        if key not in meta:
            raise DataError(f"{path}: embedding file header has no '{key}'")
    # every size field a JSON integer of the right sign before any arithmetic (fuzzing found None, strings,
    # floats and negative counts that would reach int() or np.memmap)
    for key, least in (("num_records", 0), ("dim", 1), ("data_offset", 0), ("done_offset", 0)):
        value = meta[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise DataError(f"{path}: corrupt embedding file ({key} is {_shown(value)})")
    views = meta["views"]
    if not isinstance(views, list) or not views or not all(isinstance(v, str) for v in views):
        raise DataError(f"{path}: corrupt embedding file (views is {_shown(views)})")
    n, v, d = meta["num_records"], len(views), meta["dim"]
    itemsize = np.dtype(_DTYPES[meta["dtype"]]).itemsize
    if meta["data_offset"] < 16 + length or meta["done_offset"] != meta["data_offset"] + n * v * d * itemsize:
        raise DataError(f"{path}: corrupt embedding file (offsets do not match the shape)")
    need = meta["done_offset"] + n
    size = path.stat().st_size
    if size < need:
        raise DataError(f"{path}: truncated embedding file ({size} bytes, needs {need})")
    return meta


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _create_file(
    path: Path, meta: dict[str, Any], num_records: int, dim: int, views: Sequence[str], dtype: str
) -> dict:
    """Allocate a zero-filled file (``done`` all 0) under a temporary name, sync it and rename it to ``path``."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "num_records": int(num_records),
        "dim": int(dim),
        "views": list(views),
        "dtype": dtype,
        **meta,
    }
    row_bytes = len(views) * dim * np.dtype(_DTYPES[dtype]).itemsize
    header, meta = _header_bytes(meta, row_bytes, num_records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.truncate(meta["done_offset"] + num_records)  # sparse zeros: rows and done flags
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return meta


class _RowWriter:
    """Writes rows and then their ``done`` bytes with ``pwrite``; rows reach the disk before their flags."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self.dtype = np.dtype(_DTYPES[meta["dtype"]])
        self.row_bytes = len(meta["views"]) * int(meta["dim"]) * self.dtype.itemsize
        self.data_offset, self.done_offset = int(meta["data_offset"]), int(meta["done_offset"])

    def write(self, indices: np.ndarray, rows: np.ndarray) -> None:
        """``indices`` ascending int (n,), ``rows`` (n, V, D): one ``pwrite`` per contiguous run of indices."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        runs = _runs(indices)
        for a, b in runs:
            os.pwrite(self.fd, rows[a:b].tobytes(), self.data_offset + int(indices[a]) * self.row_bytes)
        _datasync(self.fd)  # rows first: a done byte must never point at a row that is not on disk
        for a, b in runs:
            os.pwrite(self.fd, b"\x01" * (b - a), self.done_offset + int(indices[a]))

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """``[a, b)`` position ranges of ``indices`` whose values are consecutive integers."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    bounds = [0, *breaks.tolist(), len(indices)]
    return list(zip(bounds[:-1], bounds[1:]))


def _datasync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


class EmbeddingCache:
    """A read-only view of an embedding file (see the module docstring); rows are memory-mapped, not loaded.

    Attributes:
        path: the file.
        meta: the JSON header.
        num_records: N.
        dim: D.
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.num_records = int(meta["num_records"])
        self.dim = int(meta["dim"])
        self.views = list(meta["views"])
        self._data: np.ndarray | None = None
        self._done: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> EmbeddingCache:
        """Open ``path`` read-only; DataError (one line naming the file) if it is not a complete v1 embedding file."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: embedding cache not found")
        return cls(path, _read_header(path))

    # memory maps are opened lazily and never pickled, so a cache handed to DataLoader workers stays cheap
    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        if self._data is None or self._done is None:
            m = self.meta
            shape = (self.num_records, len(self.views), self.dim)
            self._data = np.memmap(self.path, dtype=_DTYPES[m["dtype"]], mode="r", offset=m["data_offset"], shape=shape)
            self._done = np.memmap(
                self.path, dtype=np.uint8, mode="r", offset=m["done_offset"], shape=(self.num_records,)
            )
        return self._data, self._done

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_data"] = state["_done"] = None
        return state

    def close(self) -> None:
        self._data = self._done = None

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_records

    @property
    def done(self) -> np.ndarray:
        """uint8 (N,): 1 where the row was written."""
        return self._maps()[1]

    @property
    def complete(self) -> bool:
        """Every row is written."""
        return bool(self.done.all())

    @property
    def dataset_fingerprint(self) -> str:
        return str((self.meta.get("dataset") or {}).get("fingerprint", ""))

    @property
    def teacher_fingerprint(self) -> str:
        return str((self.meta.get("teacher") or {}).get("fingerprint", ""))

    def missing(self) -> np.ndarray:
        """int64 indices of the records whose row is not written (failed to decode, or an unfinished run)."""
        return np.flatnonzero(self.done == 0).astype(np.int64)

    def rows(self, indices: Sequence[int] | np.ndarray | Tensor | None = None) -> np.ndarray:
        """The stored rows ``(n, V, D)`` (all of them when ``indices`` is None), in the file's dtype; no done check."""
        data = self._maps()[0]
        if indices is None:
            return np.asarray(data)
        return np.asarray(data[_as_index(indices)])

    def lookup(
        self, indices: Sequence[int] | np.ndarray | Tensor, flips: Sequence[bool] | np.ndarray | Tensor
    ) -> Tensor:
        """float32 ``(len(indices), D)``: view 1 (mirrored image) where ``flips[i]``, else view 0.

        Raises DataError naming the first requested record whose row is missing.
        """
        data, done = self._maps()
        idx = _as_index(indices)
        flip = _as_numpy(flips).astype(bool).reshape(-1)
        if flip.shape != idx.shape:
            raise ValueError(f"{len(idx)} indices but {len(flip)} flips")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_records):
            bad = int(idx[(idx < 0) | (idx >= self.num_records)][0])
            raise DataError(f"{self.path}: record index {bad} is out of range (the cache holds {self.num_records})")
        if flip.any() and len(self.views) < 2:
            raise ValueError(f"{self.path}: holds one view ({self.views[0]}); it has no mirrored rows")
        not_done = done[idx] == 0
        if not_done.any():
            first = int(idx[np.argmax(not_done)])
            n_missing = int((done == 0).sum())
            raise DataError(
                f"{self.path}: record {first} has no cached embedding ({n_missing} of {self.num_records} records "
                "missing; it failed to decode or the run that built the cache was interrupted: re-run timmface embed "
                "to fill it)"
            )
        out = data[idx, flip.astype(np.intp)] if len(self.views) > 1 else data[idx, 0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def check(
        self,
        dataset_fingerprint: str | None = None,
        teacher_fingerprint: str | None = None,
        source: str = "distill.cache",
    ) -> None:
        """DataError (one line) if the cache was built for another dataset or teacher than the ones given."""
        problems = []
        if dataset_fingerprint is not None and dataset_fingerprint != self.dataset_fingerprint:
            ds = self.meta.get("dataset") or {}
            problems.append(
                f"dataset differs (cache built from {ds.get('path') or '?'}, fingerprint "
                f"{self.dataset_fingerprint or '?'}; this dataset {dataset_fingerprint})"
            )
        if teacher_fingerprint is not None and teacher_fingerprint != self.teacher_fingerprint:
            t = self.meta.get("teacher") or {}
            problems.append(
                f"teacher differs (cache built with {t.get('path') or '?'}, fingerprint "
                f"{self.teacher_fingerprint or '?'}; this teacher {teacher_fingerprint})"
            )
        if problems:
            raise DataError(
                f"{self.path}: {source} does not match: {'; '.join(problems)}; rebuild it with "
                + _REBUILD.format(path=self.path)
            )


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_index(indices: Any) -> np.ndarray:
    return _as_numpy(indices).astype(np.int64).reshape(-1)


# --------------------------------------------------------------------------------------------------
# Reading the images
# --------------------------------------------------------------------------------------------------


class FileListDataset(Dataset):
    """Image files given by path: items ``(uint8 CHW RGB, -1)``; ``keys`` are the paths as given."""

    def __init__(self, files: Sequence[str | os.PathLike], keys: Sequence[str] | None = None) -> None:
        self.files = [str(f) for f in files]
        self.keys = np.array([str(k) for k in (keys if keys is not None else self.files)], dtype=object)
        self.labels = np.full(len(self.files), -1, dtype=np.int64)
        self.num_classes = 0
        if not self.files:
            raise DataError("no image files given")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from timmface.data.recordio import decode_image_bytes

        path = self.files[i]
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise CorruptRecordError(f"{path}: cannot read ({e.strerror})", key=str(self.keys[i])) from None
        return decode_image_bytes(data, key=str(self.keys[i]), source=path), -1


class _Items(Dataset):
    """``i`` -> ``(i, uint8 image at image_size, None)``, or ``(i, None, (key, message))`` for a corrupt record."""

    def __init__(self, base: Dataset, image_size: int) -> None:
        self.base, self.image_size = base, image_size

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, tuple[Any, str] | None]:
        try:
            image = self.base[i][0]
        except CorruptRecordError as e:
            return i, None, (e.key if e.key is not None else i, str(e))
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = resize_uint8(image, self.image_size)
        return i, image, None


def _collate(
    items: list[tuple[int, Tensor | None, Any]],
) -> tuple[np.ndarray, Tensor | None, list[tuple[int, Any, str]]]:
    good = [(i, img) for i, img, _ in items if img is not None]
    bad = [(i, b[0], b[1]) for i, img, b in items if img is None]
    indices = np.array([i for i, _ in good], dtype=np.int64)
    images = torch.stack([img for _, img in good]) if good else None
    return indices, images, bad


def _batches(
    dataset: Dataset, indices: np.ndarray, image_size: int, batch_size: int, num_workers: int
) -> Iterator[tuple[np.ndarray, Tensor | None, list[tuple[int, Any, str]]]]:
    batches = [indices[s : s + batch_size].tolist() for s in range(0, len(indices), batch_size)]
    workers = max(0, min(num_workers, len(batches) - 1))  # no worker processes for a single batch
    loader = DataLoader(
        _Items(dataset, image_size),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
        **({"prefetch_factor": 4} if workers else {}),
    )
    yield from loader


# --------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def embed_batch(
    model: nn.Module,
    images: Tensor,
    views: Sequence[str] = CACHE_VIEWS,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> Tensor:
    """float32 ``(N, V, D)`` embeddings of uint8 ``N x 3 x H x W`` RGB images, one column per view.

    Views: ``"original"`` = ``model(x)``, ``"hflip"`` = ``model(torch.flip(x, dims=[3]))``, ``"original+hflip"`` =
    their sum, where ``x`` is the trainer's [-1, 1] input (:func:`~timmface.data.loader.normalize_on_device`).
    """
    device = torch.device(device)
    x = normalize_on_device(images.to(device, non_blocking=True), None)
    out: dict[str, Tensor] = {}

    def run(name: str, inp: Tensor) -> Tensor:
        if name not in out:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out[name] = model(inp).float()
        return out[name]

    cols = []
    for view in views:
        if view == "original":
            cols.append(run("original", x))
        elif view == "hflip":
            cols.append(run("hflip", torch.flip(x, dims=[3])))
        elif view == SUM_VIEW:
            cols.append(run("original", x) + run("hflip", torch.flip(x, dims=[3])))
        else:
            raise ValueError(f"unknown view {view!r}")
    return torch.stack(cols, dim=1)


def _probe_dim(model: nn.Module, image_size: int, device: torch.device) -> int:
    """The embedding size, from one forward of a grey image (a timm ViT's ``embed_dim`` is its width, not this)."""
    with torch.no_grad():
        y = model(torch.zeros(1, 3, image_size, image_size, device=device))
    if y.ndim != 2:
        raise DataError(f"the model returned shape {tuple(y.shape)} for one image; expected 1 x D")
    return int(y.shape[1])


@dataclass
class FillReport:
    """What one :func:`fill_embeddings` call did."""

    path: Path
    num_records: int
    written: int = 0
    """Rows computed by this call."""
    skipped: int = 0
    """Rows already done when the call started (a resumed run)."""
    bad: list[tuple[int, Any, str]] = field(default_factory=list)
    """``(index, key, message)`` of the records that failed to decode in this call."""
    seconds: float = 0.0


class _Progress:
    """A rich progress bar on a terminal; on a pipe or a log file (a batch job), one plain line every ``every`` s."""

    def __init__(self, enabled: bool, total: int, done: int, label: str, every: float = 30.0) -> None:
        import sys

        self.total, self.done, self.label, self.every = total, done, label, every
        self.mode = ("rich" if sys.stdout.isatty() else "plain") if enabled else "off"
        self.t0 = self.last = time.perf_counter()
        self.start = done
        self._bar: Any = None
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[rate]}"),
            )
            self._task = self._bar.add_task(label, total=total, completed=done, rate="")
            self._bar.start()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        rate = (self.done - self.start) / max(now - self.t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{rate:.0f} img/s")
        elif self.mode == "plain" and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"{self.label}: {self.done}/{self.total} ({100 * self.done / self.total:.1f}%), {rate:.0f} img/s, "
                  f"eta {eta / 60:.1f} min", flush=True)  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _checked_rows(rows: Tensor, dtype: str, indices: np.ndarray, out: Path) -> np.ndarray:
    """``rows`` in the file's dtype; DataError if a value is not finite there (float16 overflows above 65504)."""
    arr = rows.cpu().numpy().astype(_DTYPES[dtype])
    bad = ~np.isfinite(arr).reshape(len(arr), -1).all(1)
    if bad.any():
        raise DataError(
            f"{out}: the model's embedding of record {int(indices[np.argmax(bad)])} is not finite in {dtype} "
            f"(max |value| {float(rows.abs().max()):.3g}); check the model (or its --amp precision)"
        )
    return arr


def _open_or_create(
    out: Path, meta: dict[str, Any], num_records: int, dim: int, views: Sequence[str], dtype: str, resume: bool
) -> dict[str, Any]:
    """The header of ``out``: the existing file's when it matches the request and ``resume``, else a new file's."""
    if resume and out.exists():
        try:
            old = _read_header(out)
        except DataError as e:
            raise DataError(f"{e}; pass --overwrite to replace it, or choose another --out") from None
        want = {
            "num_records": num_records,
            "dim": dim,
            "views": list(views),
            "dtype": dtype,
            "image_size": meta.get("image_size"),
            "dataset fingerprint": (meta.get("dataset") or {}).get("fingerprint"),
            "teacher fingerprint": (meta.get("teacher") or {}).get("fingerprint"),
        }
        have = {
            **{k: old.get(k) for k in ("num_records", "dim", "views", "dtype", "image_size")},
            "dataset fingerprint": (old.get("dataset") or {}).get("fingerprint"),
            "teacher fingerprint": (old.get("teacher") or {}).get("fingerprint"),
        }
        diff = [f"{k} {have[k]!r} (file) != {want[k]!r} (now)" for k in want if have[k] != want[k]]
        if diff:
            raise DataError(
                f"{out}: exists and was written for something else ({'; '.join(diff[:3])}); "
                "pass --overwrite to replace it, or choose another --out"
            )
        return old
    return _create_file(out, meta, num_records, dim, views, dtype)


def fill_embeddings(
    model: nn.Module,
    dataset: Dataset,
    out: str | Path,
    *,
    meta: dict[str, Any],
    views: Sequence[str] = CACHE_VIEWS,
    dtype: str = "float16",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 4,
    image_size: int = 112,
    progress: bool = True,
    resume: bool = True,
    label: str = "embed",
) -> FillReport:
    """Create (or reopen, with ``resume``) the embedding file ``out`` and compute every row whose ``done`` is 0.

    ``meta`` goes into the header (``dataset``, ``teacher``, ... ; ``image_size`` and ``created`` are added). An
    existing file whose header does not match (records, dim, views, dtype, image size, dataset or teacher
    fingerprint) is refused with a DataError; ``resume=False`` replaces it.
    """
    out = Path(out)
    t0 = time.perf_counter()
    dev = _device_of(model, device)
    model = model.to(dev).eval()
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError(f"{out}: the dataset is empty")
    dim = _probe_dim(model, image_size, dev)
    meta = {**meta, "image_size": int(image_size), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    header = _open_or_create(out, meta, n, dim, views, dtype, resume)
    with EmbeddingCache(out, header) as existing:
        todo = existing.missing()
    report = FillReport(out, n, skipped=n - len(todo))
    writer = _RowWriter(out, header)
    bar = _Progress(progress and len(todo) > 0, n, n - len(todo), label)
    try:
        for indices, images, bad in _batches(dataset, todo, image_size, batch_size, num_workers):
            report.bad.extend(bad)
            if images is not None:
                rows = embed_batch(model, images, views, dev, amp_dtype)
                if rows.shape[1:] != (len(views), dim):
                    raise DataError(
                        f"the model returned rows of shape {tuple(rows.shape[1:])}, expected {(len(views), dim)}"
                    )
                writer.write(indices, _checked_rows(rows, dtype, indices, out))
                report.written += len(indices)
            bar.update(len(indices) + len(bad))
    finally:
        bar.close()
        writer.close()
        report.seconds = time.perf_counter() - t0
    return report


def build_cache(
    model: nn.Module,
    dataset: Dataset,
    out: str | Path,
    *,
    teacher_path: str = "",
    teacher_fingerprint: str = "",
    teacher_info: dict | None = None,
    dataset_path: str = "",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 4,
    image_size: int = 112,
    progress: bool = True,
    resume: bool = True,
) -> Path:
    """Write the teacher-embedding cache of ``dataset``: float16 ``(N, 2, D)`` (image, mirrored image) + ``done``.

    With ``resume`` an existing cache for the same dataset and teacher is completed (only rows with ``done == 0`` are
    computed); one for another dataset or teacher is refused (DataError). ``resume=False`` starts a new file.
    Records that fail to decode stay missing (``done = 0``): :meth:`EmbeddingCache.missing` lists them (``timmface
    embed`` prints their keys).
    """
    meta = {
        "dataset": {
            "path": str(dataset_path or getattr(dataset, "root", "") or ""),
            "fingerprint": dataset_fingerprint(dataset),
            "num_records": len(dataset),  # type: ignore[arg-type]
            "num_classes": int(getattr(dataset, "num_classes", 0) or 0),
        },
        "teacher": {
            "path": str(teacher_path),
            "fingerprint": str(teacher_fingerprint),
            "info": dict(teacher_info or {}),
        },
    }
    fill_embeddings(
        model, dataset, out, meta=meta, views=CACHE_VIEWS, dtype="float16", batch_size=batch_size, device=device,
        amp_dtype=amp_dtype, num_workers=num_workers, image_size=image_size, progress=progress, resume=resume,
        label="teacher cache",
    )  # fmt: skip
    return Path(out)


# --------------------------------------------------------------------------------------------------
# Plain embedding files: .safetensors or .npy (+ keys)
# --------------------------------------------------------------------------------------------------


def _int_keys(keys: np.ndarray) -> bool:
    return keys.dtype.kind in "iu"


def write_embeddings(
    out: str | Path,
    embeddings: np.ndarray,
    keys: np.ndarray,
    labels: np.ndarray | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``embeddings`` (N, D) with their ``keys`` (and ``labels``) to ``out``; returns the files written.

    ``.safetensors``: tensors ``embeddings``, ``keys`` (int64, for RecordIO keys) or ``keys_utf8`` + ``keys_offsets``
    (UTF-8 bytes of path keys and their N + 1 offsets), ``labels`` when known; ``metadata`` as its string metadata.
    ``.npy``: the array; keys in ``<stem>.keys.txt`` (one per line), labels in ``<stem>.labels.npy``.
    Each file is written under a temporary name and renamed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = np.asarray(keys)
    written: list[Path] = []

    def atomic(path: Path, write: Callable[[Path], None]) -> None:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(path)

    if out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {"embeddings": np.ascontiguousarray(embeddings)}
        if _int_keys(keys):
            tensors["keys"] = keys.astype(np.int64)
        else:
            encoded = [str(k).encode("utf-8", "surrogateescape") for k in keys]
            tensors["keys_utf8"] = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
            tensors["keys_offsets"] = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
        if labels is not None:
            tensors["labels"] = np.asarray(labels, dtype=np.int64)
        meta = {"format": FORMAT, "keys": "int64" if _int_keys(keys) else "utf8", **(metadata or {})}
        atomic(out, lambda p: save_file(tensors, str(p), metadata=meta))
    elif out.suffix == ".npy":
        if any("\n" in str(k) for k in keys.tolist()):
            raise DataError(f"{out}: a key holds a newline; write .safetensors instead")
        text = "".join(f"{k}\n" for k in keys.tolist())
        atomic(out, lambda p: _save_npy(p, embeddings))
        atomic(out.with_name(out.stem + ".keys.txt"), lambda p: p.write_text(text, encoding="utf-8"))
        if labels is not None:
            atomic(out.with_name(out.stem + ".labels.npy"), lambda p: _save_npy(p, np.asarray(labels, dtype=np.int64)))
    else:
        raise DataError(f"{out}: unknown output format '{out.suffix}' (use .safetensors, .npy or .tfemb)")
    return written


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def embed_to_file(
    model: nn.Module,
    dataset: Dataset,
    out: str | Path,
    *,
    meta: dict[str, Any],
    flip: bool = False,
    normalize: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 4,
    image_size: int = 112,
    progress: bool = True,
) -> tuple[FillReport, list[Path], np.ndarray]:
    """Embed every image of ``dataset`` into ``out`` (``.safetensors`` / ``.npy``), resumably.

    Rows accumulate in ``<out>.partial`` (a float32 embedding file, see the module docstring): an interrupted run
    continues from it, computing only the rows not yet written; it is converted to ``out`` and deleted at the end.
    ``flip`` stores ``f(x) + f(flip(x))``; ``normalize`` L2-normalises. Records that fail to decode are left out.

    Returns the fill report, the files written and the indices of the records left out.
    """
    out = Path(out)
    if out.suffix not in (".safetensors", ".npy"):
        raise DataError(f"{out}: unknown output format '{out.suffix}' (use .safetensors, .npy or .tfemb)")
    partial = out.with_name(out.name + ".partial")
    if overwrite:
        partial.unlink(missing_ok=True)
    elif out.exists() and not partial.exists():
        raise DataError(f"{out}: already exists; pass --overwrite to replace it")
    report = fill_embeddings(
        model, dataset, partial, meta=meta, views=[SUM_VIEW] if flip else ["original"], dtype="float32",
        batch_size=batch_size, device=device, amp_dtype=amp_dtype, num_workers=num_workers, image_size=image_size,
        progress=progress, resume=not overwrite,
    )  # fmt: skip
    with EmbeddingCache.open(partial) as store:
        done = np.flatnonzero(store.done)
        missing = store.missing()
        emb = store.rows(done)[:, 0].astype(np.float32)
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    keys = np.asarray(getattr(dataset, "keys", np.arange(len(dataset))))  # type: ignore[arg-type]
    labels = getattr(dataset, "labels", None)
    labels = np.asarray(labels)[done] if labels is not None and int(getattr(dataset, "num_classes", 0) or 0) else None
    info = {
        "model": str((meta.get("teacher") or {}).get("path", "")),
        "model_fingerprint": str((meta.get("teacher") or {}).get("fingerprint", "")),
        "dataset_fingerprint": str((meta.get("dataset") or {}).get("fingerprint", "")),
        "views": SUM_VIEW if flip else "original",
        "normalized": str(normalize).lower(),
        "image_size": str(image_size),
        "num_missing": str(len(missing)),
    }
    files = write_embeddings(out, emb.astype(_DTYPES[dtype]), keys[done], labels, info)
    partial.unlink(missing_ok=True)
    return report, files, missing


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(keys, embeddings (N, D), labels or None)`` from a file written by :func:`write_embeddings`.

    Keys are int64 for RecordIO records, else an object array of strings.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        t = load_file(str(path))
        if "keys" in t:
            keys = t["keys"]
        else:
            raw, offs = t["keys_utf8"].tobytes(), t["keys_offsets"]
            keys = np.array(
                [raw[offs[i] : offs[i + 1]].decode("utf-8", "surrogateescape") for i in range(len(offs) - 1)],
                dtype=object,
            )
        return keys, t["embeddings"], t.get("labels")
    if path.suffix == ".npy":
        emb = np.load(path, allow_pickle=False)
        lines = path.with_name(path.stem + ".keys.txt").read_text(encoding="utf-8").splitlines()
        keys = np.array(lines, dtype=object)
        if lines and all(k.lstrip("-").isdigit() for k in lines):
            keys = keys.astype(np.int64)
        labels_path = path.with_name(path.stem + ".labels.npy")
        labels = np.load(labels_path, allow_pickle=False) if labels_path.exists() else None
        return keys, emb, labels
    raise DataError(f"{path}: unknown embedding file format '{path.suffix}'")
