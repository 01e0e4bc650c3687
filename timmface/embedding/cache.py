"""The teacher-embedding cache file (``.tfemb``): its format, fingerprints, and a memory-mapped reader.

File layout (version 1)::

    bytes 0-7      magic b"TFEMBED1"
    bytes 8-15     H, little-endian uint64
    next H bytes   UTF-8 JSON header, padded with spaces so the data starts at a multiple of 4096
    data_offset    C-order array (N, V, D) of ``dtype`` (float16 for a teacher cache; V = 2 views:
                   0 = the image, 1 = its horizontal mirror)
    done_offset    uint8 array (N,): 1 = row i was written

Record ``i`` is dataset index ``i`` (the order of ``dataset.keys``). The image given to the model is exactly what
the student is trained on before flip and normalisation: ``dataset[i]`` (uint8 CHW RGB), resized with
:func:`~timmface.data.image.resize_uint8` when it is not ``image_size``, mapped to [-1, 1] by
:func:`~timmface.data.batch.normalize_on_device`; the mirrored view is ``torch.flip(x, dims=[3])`` of that.

Writing is crash-safe: :func:`create_file` allocates the file under a temporary name and renames it, then
:class:`RowWriter` writes and syncs each batch's rows *before* their ``done`` bytes, so a killed run loses at most
the batches in flight and a re-run fills only the rows whose ``done`` byte is 0. Records that fail to decode keep
``done = 0``; the cache stays usable and :meth:`EmbeddingCache.lookup` names a missing record if one is ever asked
for. What computes the rows is :mod:`timmface.embedding.engine`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from timmface.errors import DataError

__all__ = [
    "ALIGN",
    "CACHE_VIEWS",
    "DTYPES",
    "FORMAT",
    "MAGIC",
    "SUM_VIEW",
    "VERSION",
    "EmbeddingCache",
    "RowWriter",
    "create_file",
    "dataset_fingerprint",
    "read_header",
]

MAGIC = b"TFEMBED1"
FORMAT = "timmface-embeddings"
VERSION = 1
ALIGN = 4096  # data starts on a page boundary, so the memory map of the rows is page-aligned
CACHE_VIEWS = ("original", "hflip")
SUM_VIEW = "original+hflip"  # one view: f(x) + f(flip(x)), insightface's Accuracy-Flip feature
DTYPES = {"float16": np.float16, "float32": np.float32}
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


def read_header(path: Path) -> dict[str, Any]:
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
    if not isinstance(meta.get("dtype"), str) or meta["dtype"] not in DTYPES:  # (a list is unhashable)
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
    itemsize = np.dtype(DTYPES[meta["dtype"]]).itemsize
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


def create_file(path: Path, meta: dict[str, Any], num_records: int, dim: int, views: Sequence[str], dtype: str) -> dict:
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
    row_bytes = len(views) * dim * np.dtype(DTYPES[dtype]).itemsize
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


class RowWriter:
    """Writes rows and then their ``done`` bytes with ``pwrite``; rows reach the disk before their flags."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self.dtype = np.dtype(DTYPES[meta["dtype"]])
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
        return cls(path, read_header(path))

    # memory maps are opened lazily and never pickled, so a cache handed to DataLoader workers stays cheap
    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        if self._data is None or self._done is None:
            m = self.meta
            shape = (self.num_records, len(self.views), self.dim)
            self._data = np.memmap(self.path, dtype=DTYPES[m["dtype"]], mode="r", offset=m["data_offset"], shape=shape)
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
