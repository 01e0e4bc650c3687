"""InsightFace RecordIO (``train.rec``, ``train.idx``, ``property``), read and written without mxnet.

Format (see ``/work/shared/REFERENCE.md`` and dmlc-core ``src/recordio.cc``):

* ``train.rec`` is a sequence of records. Each record part is ``uint32 magic 0xced7230a``, ``uint32
  lrec`` (upper 3 bits: continuation flag, lower 29 bits: part length), the part's bytes, zero padding
  to 4 bytes. dmlc's writer splits a payload wherever the magic word occurs at a 4-byte aligned
  position: the parts carry cflag 1 (first), 2 (middle), 3 (last), and the reader re-inserts the magic
  word between them. A whole record has cflag 0.
* A payload starts with the IRHeader ``struct "IfQQ"`` (flag, label, id, id2; 24 bytes, little-endian).
  When ``flag > 0``, ``flag`` float32 labels follow and the scalar label is unused. The rest is the
  image (JPEG).
* Record 0 is usually a header (flag > 0, labels ``[a, b]``): image keys are ``1 .. a-1`` and keys
  ``a .. b-1`` are per-identity records whose labels ``[start, end)`` give that identity's image keys.
  Some packs have no header: every key in the index is then an image.
* ``train.idx``: text lines ``key<TAB>byte offset``. ``property``: ``num_classes,height,width``.

In this file, top to bottom: records (IRHeader payloads, dmlc framing), the index and its cache, the
dataset (:class:`RecordIODataset`) and the writer (:class:`RecordIOWriter`). Image decoding is not
RecordIO's own: it lives in :mod:`timmface.data.image`, shared with every other format.

The parsed index is cached in timmface's cache folder (``idx/`` under ``$TIMMFACE_CACHE``, see
:mod:`timmface.cache`; never in the dataset's own folder), keyed by the index's absolute path and checked
against its size, mtime and a hash of its head and tail, so a changed ``train.idx`` is re-parsed.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from timmface.data.image import check_image_size, decode_image_bytes
from timmface.errors import CorruptRecordError, DataError
from timmface.fileio import atomic_write, output_mode, replaceable_folder

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1  # lower 29 bits of lrec: the part length (dmlc DecodeLength)
IR_FORMAT = "<IfQQ"  # flag, label, id, id2 (mxnet recordio.py `_IR_FORMAT`, little-endian on every mxnet host)
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
_FLOAT_EXACT = 1 << 24  # float32 labels hold integers exactly only below 2**24
_CACHE_VERSION = "1"
_HASH_SPAN = 1 << 16  # bytes of head and tail of train.idx hashed into the cache fingerprint
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_SIDE = 65535  # the largest JPEG (and GIF) side; property values beyond it are not image sizes


# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class IRHeader:
    """The 24-byte image-record header; ``labels`` holds the ``flag`` float32 labels that follow it."""

    flag: int
    label: float
    id: int
    id2: int
    labels: tuple[float, ...] = ()

    @property
    def class_label(self) -> float:
        """The label an image record stands for: the scalar when ``flag == 0``, else the first label."""
        return self.labels[0] if self.flag > 0 else self.label


def pack_payload(label: float | tuple[float, ...] | list[float], data: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Build a record payload as ``mx.recordio.pack`` does: a scalar label gives flag 0, a sequence
    gives ``flag = len(labels)`` with the float32 labels written after the header (scalar label 0)."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return struct.pack(IR_FORMAT, 0, float(label), id, id2) + bytes(data)
    values = np.asarray(label, dtype="<f4").ravel()
    return struct.pack(IR_FORMAT, values.size, 0.0, id, id2) + values.tobytes() + bytes(data)


def unpack_payload(payload: bytes | memoryview) -> tuple[IRHeader, bytes]:
    """Split a payload into its :class:`IRHeader` and the image bytes (``mx.recordio.unpack``).

    Raises :class:`CorruptRecordError` (the project's error, so a reader of untrusted files needs to
    catch nothing else) when the payload is too short for its header or the labels it announces.
    """
    if len(payload) < IR_SIZE:
        raise CorruptRecordError(f"payload of {len(payload)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = struct.unpack_from(IR_FORMAT, payload, 0)
    start = IR_SIZE
    labels: tuple[float, ...] = ()
    if flag > 0:
        start += 4 * flag
        if len(payload) < start:  # checked before the labels are unpacked: flag is a size field of the file
            raise CorruptRecordError(f"IRHeader announces {flag} labels but the payload has only {len(payload)} bytes")
        labels = struct.unpack_from(f"<{flag}f", payload, IR_SIZE)
    return IRHeader(flag, label, id_, id2, labels), bytes(payload[start:])


def frame_record(payload: bytes) -> bytes:
    """Frame a payload as dmlc ``RecordIOWriter::WriteRecord`` does, splitting it at every 4-byte
    aligned occurrence of the magic word (so a reader that scans for magic words never mis-syncs)."""
    if len(payload) > _LENGTH_MASK:
        raise ValueError(f"a RecordIO record must be shorter than 2**29 bytes, got {len(payload)}")
    out = bytearray()
    view = memoryview(payload)
    start = 0
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:  # dmlc only checks aligned words
            cflag = 1 if start == 0 else 2
            out += struct.pack("<II", MAGIC, (cflag << 29) | (pos - start)) + view[start:pos]
            start = pos + 4
        pos = payload.find(_MAGIC_BYTES, pos + 1)
    cflag = 3 if start else 0
    out += struct.pack("<II", MAGIC, (cflag << 29) | (len(payload) - start)) + view[start:]
    out += b"\0" * (-len(out) % 4)
    return bytes(out)


# ------------------------------------------------------------------------------------------------- index


def parse_idx(data: bytes, source: str | os.PathLike = "train.idx") -> tuple[np.ndarray, np.ndarray]:
    """Parse ``train.idx`` text into ``(keys, offsets)`` int64 arrays, in file order.

    ``np.fromstring(sep=" ")`` parses whitespace-separated integers in C (a 5.2M-line index in ~0.3 s,
    about as fast as ``np.loadtxt`` with numpy 2.x and far faster than a per-line loop; the parsed arrays are
    cached as binary, see :func:`load_index`); anything it cannot explain falls back to a line-by-line parse
    that names the bad line.
    """
    if data.translate(None, b"0123456789\t\n\r ") == b"":  # (so no sign: keys and offsets >= 0 here)
        lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                values = np.fromstring(data.decode("ascii"), dtype=np.int64, sep=" ")
            except (ValueError, DeprecationWarning):
                values = None
        # numpy clamps a number past int64 to the int64 maximum without a word (fuzzing found it): such an
        # index goes to the strict parse, which names the line
        if values is not None and values.size == 2 * lines and not (values == np.iinfo(np.int64).max).any():
            pairs = values.reshape(-1, 2)
            return np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
    return _parse_idx_lines(data, source)


def _parse_idx_lines(data: bytes, source: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Slow, strict parse used when the fast one fails; blank lines are allowed, anything else is named."""
    keys: list[int] = []
    offsets: list[int] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            key, offset = int(fields[0]), int(fields[1])
            if offset < 0 or not _INT64_MIN <= key < _INT64_MAX or offset >= _INT64_MAX:  # np.asarray below
                raise ValueError
        except ValueError:
            text = line.decode("latin-1").strip()[:60]
            raise DataError(f"{source}: line {number} is not 'key<TAB>offset': {text!r}") from None
        keys.append(key)
        offsets.append(offset)
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def _idx_fingerprint(idx_path: Path) -> str:
    """Size, mtime and a hash of head and tail: changes whenever train.idx is rewritten."""
    st = idx_path.stat()
    h = hashlib.blake2b(digest_size=16)
    with open(idx_path, "rb") as f:
        h.update(f.read(_HASH_SPAN))
        if st.st_size > _HASH_SPAN:
            f.seek(max(_HASH_SPAN, st.st_size - _HASH_SPAN))
            h.update(f.read(_HASH_SPAN))
    return f"v{_CACHE_VERSION}:{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"


def index_cache_path(idx_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the parsed index of ``idx_path`` is cached: ``cache_dir`` (default: ``idx/`` of
    :func:`timmface.cache.cache_root`), under a hash of the index's absolute path."""
    from timmface.cache import cache_root

    name = hashlib.blake2b(str(Path(idx_path).resolve()).encode(), digest_size=12).hexdigest() + ".npz"
    return (Path(cache_dir) if cache_dir is not None else cache_root() / "idx") / name


def _read_cache(path: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the cache is missing, stale or damaged in any way.

    The cache is only ever a shortcut, so every failure to read it means "parse train.idx again": a damaged
    zip raises BadZipFile, struct.error, zlib.error, ... (fuzzing found several), not only OSError.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            arrays = {k: z[k] for k in z.files}
    except Exception:
        return None
    keys, offsets = arrays.get("keys"), arrays.get("offsets")
    if keys is None or offsets is None:
        return arrays  # an entry written by _update_cache's caller before the index: checked by its reader
    if keys.ndim != 1 or keys.shape != offsets.shape or keys.dtype.kind != "i" or offsets.dtype.kind != "i":
        return None
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temporary file in the target folder, then rename); a cache that cannot be written (a
    read-only or full disk) is only a lost shortcut."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError:
        pass


def load_index(
    idx_path: str | os.PathLike, cache: bool = True, cache_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, offsets)`` of ``train.idx`` in file order, through the binary cache when ``cache``."""
    idx_path = Path(idx_path)
    if not cache:
        return parse_idx(idx_path.read_bytes(), idx_path)
    fingerprint = _idx_fingerprint(idx_path)
    path = index_cache_path(idx_path, cache_dir)
    hit = _read_cache(path, fingerprint)
    if hit is not None and "keys" in hit and "offsets" in hit:
        return hit["keys"].astype(np.int64, copy=False), hit["offsets"].astype(np.int64, copy=False)
    keys, offsets = parse_idx(idx_path.read_bytes(), idx_path)
    _write_cache(path, {"fingerprint": np.array(fingerprint), "keys": keys, "offsets": offsets})
    return keys, offsets


def _update_cache(idx_path: Path, cache_dir: str | os.PathLike | None, extra: dict[str, np.ndarray]) -> None:
    """Add arrays (e.g. scanned labels) to the cache entry of ``idx_path``, if it is current."""
    path = index_cache_path(idx_path, cache_dir)
    hit = _read_cache(path, _idx_fingerprint(idx_path))
    if hit is not None:
        hit.update(extra)
        _write_cache(path, hit)


def _cached_array(idx_path: Path, cache_dir: str | os.PathLike | None, name: str, stamp: str) -> np.ndarray | None:
    hit = _read_cache(index_cache_path(idx_path, cache_dir), _idx_fingerprint(idx_path))
    if hit is not None and name in hit and str(hit.get(name + "_stamp", "")) == stamp:
        return hit[name]
    return None


# ------------------------------------------------------------------------------------------------ dataset


class RecordIODataset(Dataset):
    """An InsightFace RecordIO folder (``train.rec``, ``train.idx``, optional ``property``).

    Items are ``(image, label)``: without a transform, ``image`` is a ``uint8`` RGB tensor (3, H, W)
    and ``label`` a python ``int``. The file is memory-mapped lazily in each process, so the dataset
    pickles cheaply into DataLoader workers.

    Attributes:
        keys: int64 array, the record key of every image, in dataset order.
        labels: int64 array, the class of every image (from the per-identity records when present,
            else from the image records' headers; never by decoding).
        num_classes: from ``property``, else the number of identity records, else ``max(labels) + 1``.
        image_size: ``(height, width)`` from ``property``, else that of the first decodable image (None if
            none of the first 8 decodes).
        rec_path, idx_path, root: the files read.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Callable[[torch.Tensor], Any] | None = None,
        *,
        index_cache: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.transform = transform
        self.root, self.rec_path, self.idx_path = _resolve_paths(Path(path))
        self._cache_dir = cache_dir
        self._index_cache = index_cache
        self._mm: mmap.mmap | None = None
        self._words: np.ndarray | None = None
        self._size = self.rec_path.stat().st_size

        idx_keys, idx_offsets = load_index(self.idx_path, cache=index_cache, cache_dir=cache_dir)
        if idx_keys.size == 0:
            raise DataError(f"{self.idx_path}: lists no records")
        self._key_table = _KeyTable(idx_keys, idx_offsets, self.idx_path)
        self._check_offsets(idx_keys, idx_offsets)

        prop_classes, image_size = self._read_property()
        self.image_size: tuple[int, int] | None = image_size
        self._identity_ranges: np.ndarray | None = None
        header = self._header_range(idx_keys)
        if header is not None:
            a, b = header
            self.keys = np.arange(1, a, dtype=np.int64)
            self._offsets = self._key_table.lookup(self.keys, "the header record (key 0) announces")
            self.labels = self._labels_from_identities(a, b)
        else:
            self.keys = idx_keys.copy()
            self._offsets = idx_offsets.copy()
            self.labels = self._scan_labels()
        if self._identity_ranges is not None and prop_classes is None:
            prop_classes = len(self._identity_ranges)
        self.num_classes = int(prop_classes) if prop_classes is not None else int(self.labels.max(initial=-1)) + 1
        self._check_labels()
        if self.image_size is None:
            self.image_size = self._probe_size()

    def _probe_size(self) -> tuple[int, int] | None:
        """Without ``property``: the size of the first decodable image among the first few."""
        for i in range(min(len(self), 8)):
            try:
                img = self.decode(i)
            except CorruptRecordError:
                continue
            return int(img.shape[1]), int(img.shape[2])
        return None

    # -- paths, property and cheap checks at open ---------------------------------------------------------

    def _read_property(self) -> tuple[int | None, tuple[int, int] | None]:
        prop = self.root / "property"
        if not prop.is_file():
            return None, None
        text = prop.read_text(errors="replace").strip()
        try:
            fields = [int(x) for x in text.replace(" ", "").split(",")]
            # size fields: float32 labels address at most 2**24 classes, JPEG sides are below 2**16
            if len(fields) != 3 or min(fields) <= 0 or fields[0] > _FLOAT_EXACT or max(fields[1:]) > _MAX_SIDE:
                raise ValueError
        except ValueError:
            raise DataError(f"{prop}: expected 'num_classes,height,width', got {text[:60]!r}") from None
        return fields[0], (fields[1], fields[2])

    def _check_offsets(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        """An index that points past the end, and the first and last records' magic words."""
        worst = int(np.argmax(offsets))
        if int(offsets.min()) < 0:
            first = int(np.argmin(offsets))
            raise DataError(f"{self.idx_path}: key {int(keys[first])} has the negative offset {int(offsets[first])}")
        if int(offsets[worst]) + 8 > self._size:
            raise self._truncated(int(keys[worst]), int(offsets[worst]), int(offsets[worst]) + 8)
        for i in {int(np.argmin(offsets)), worst}:
            self._read_payload(int(keys[i]), int(offsets[i]))

    def _check_labels(self) -> None:
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if bad.size:
            i = int(bad[0])
            origin = "property" if (self.root / "property").is_file() else "the data"
            raise DataError(
                f"{self.rec_path}: image key {int(self.keys[i])} has label {int(self.labels[i])}, outside "
                f"[0, {self.num_classes}) (num_classes from {origin})"
            )

    # -- header, identity records and labels -------------------------------------------------------------

    def _header_range(self, idx_keys: np.ndarray) -> tuple[int, int] | None:
        """``(a, b)`` from record 0 when it is a header: flag >= 2, no image, ``1 <= a <= b``."""
        if not self._key_table.has(0):
            return None
        header, image = self._unpack(0, self._read_payload(0, self._key_table.offset(0)))
        if header.flag < 2 or image:
            return None
        a, b = header.labels[0], header.labels[1]
        # (not int(a) first: a label may be inf or nan, and int() of those raises -- found by fuzzing)
        if not (math.isfinite(a) and math.isfinite(b) and a == int(a) and b == int(b) and 1 <= a <= b):
            return None
        if b > len(idx_keys):  # keys 0 .. b-1 must all be in the index: never allocate ranges the index cannot hold
            raise DataError(
                f"{self.rec_path}: the header record (key 0) announces keys up to {int(b) - 1}, but "
                f"{self.idx_path.name} lists only {len(idx_keys)} records"
            )
        return int(a), int(b)

    def _labels_from_identities(self, a: int, b: int) -> np.ndarray:
        """Labels of image keys ``1..a-1`` from identity records ``a..b-1`` (identity j = class j)."""
        if b == a:
            return self._scan_labels()
        id_keys = np.arange(a, b, dtype=np.int64)
        id_offsets = self._key_table.lookup(id_keys, "the header record (key 0) announces identity")
        heads = self._gather_headers(id_keys, id_offsets)
        starts, ends = heads["label0"], heads["label1"]
        # an identity without images may hold any empty range (our writer uses [0, 0))
        ok = (heads["flag"] >= 2) & ((starts == ends) | ((starts >= 1) & (starts < ends) & (ends <= a)))
        if not ok.all():
            j = int(np.flatnonzero(~ok)[0])
            warnings.warn(
                f"{self.rec_path}: identity record {int(id_keys[j])} is not a [start, end) key range; "
                "reading labels from the image headers instead",
                stacklevel=3,
            )
            return self._scan_labels()
        starts, ends = starts.astype(np.int64), ends.astype(np.int64)
        label_of_key = np.full(a, -1, dtype=np.int64)
        # every key of every non-empty range, vectorised (a python loop over 93k identities is slow)
        filled = np.flatnonzero(ends > starts)
        lengths = (ends - starts)[filled]
        first = np.cumsum(lengths) - lengths  # where each range starts in the concatenation
        positions = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(first - starts[filled], lengths)
        label_of_key[positions] = np.repeat(filled, lengths)
        labels = label_of_key[self.keys]
        probe = np.unique(np.linspace(0, len(self.keys) - 1, num=min(9, len(self.keys))).astype(np.int64))
        own = self._gather_headers(self.keys[probe], self._offsets[probe])["class_label"]
        if (labels < 0).any() or not np.array_equal(own.astype(np.int64), labels[probe]):
            warnings.warn(
                f"{self.rec_path}: identity records disagree with the image headers; reading labels from the headers",
                stacklevel=3,
            )
            return self._scan_labels()
        self._identity_ranges = np.stack([starts, ends], axis=1)
        return labels

    def _scan_labels(self) -> np.ndarray:
        """Labels from every image record's header (no decoding), cached next to the index."""
        st = self.rec_path.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}:{hashlib.blake2b(self.keys.tobytes(), digest_size=8).hexdigest()}"
        if self._index_cache:
            hit = _cached_array(self.idx_path, self._cache_dir, "scan_labels", stamp)
            if hit is not None and hit.shape == self.keys.shape:
                return hit.astype(np.int64, copy=False)
        labels = self._gather_headers(self.keys, self._offsets)["class_label"]
        bad = ~np.isfinite(labels) | (labels != np.floor(labels))  # an infinite label passes the floor test
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{self.rec_path}: image key {int(self.keys[i])} has a non-integer label {labels[i]}")
        labels = labels.astype(np.int64)
        if self._index_cache:
            _update_cache(self.idx_path, self._cache_dir, {"scan_labels": labels, "scan_labels_stamp": np.array(stamp)})
        return labels

    def _gather_headers(self, keys: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
        """Read the framing and IRHeader of many records at once from the memory map.

        Records start at multiples of 4 (every part is padded to 4 bytes), so the file is viewed as
        uint32 words and each field is one vectorised gather. Records that are split into parts
        early, or misaligned, take the exact per-record path.
        """
        words = self._word_view()
        n = len(keys)
        out = {name: np.zeros(n, dtype=np.float64) for name in ("flag", "class_label", "label0", "label1")}
        if n == 0:
            return out
        w = offsets // 4
        fast = (offsets % 4 == 0) & (w + 10 <= words.size)
        wf = w[fast]
        magic = words[wf]
        if (magic != MAGIC).any():
            j = int(np.flatnonzero(magic != MAGIC)[0])
            k, o = int(keys[fast][j]), int(offsets[fast][j])
            raise DataError(f"{self.rec_path}: no RecordIO magic number at byte {o} (key {k}); train.idx disagrees")
        lrec = words[wf + 1]
        flag = words[wf + 2].astype(np.int64)
        need = IR_SIZE + 4 * np.minimum(flag, 2)
        fast_idx = np.flatnonzero(fast)
        # the record's first part holds the whole header (else: split early, short or bad -> exact path)
        whole = ((lrec >> 29) <= 1) & ((lrec & _LENGTH_MASK) >= need)
        floats = words.view(np.float32)
        sel = fast_idx[whole]
        ws = w[sel]
        out["flag"][sel] = flag[whole]
        scalar = floats[ws + 3].astype(np.float64)
        l0 = floats[ws + 8].astype(np.float64)
        l1 = floats[ws + 9].astype(np.float64)
        has = flag[whole] > 0
        out["class_label"][sel] = np.where(has, l0, scalar)
        out["label0"][sel] = np.where(has, l0, 0.0)
        out["label1"][sel] = np.where(flag[whole] > 1, l1, 0.0)
        slow = np.ones(n, dtype=bool)
        slow[sel] = False
        for i in np.flatnonzero(slow):
            header, _ = self._unpack(int(keys[i]), self._read_payload(int(keys[i]), int(offsets[i])))
            out["flag"][i] = header.flag
            out["class_label"][i] = header.class_label
            out["label0"][i] = header.labels[0] if header.flag > 0 else 0.0
            out["label1"][i] = header.labels[1] if header.flag > 1 else 0.0
        return out

    # -- reading --------------------------------------------------------------------------------------

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            if self._size == 0:
                raise DataError(f"{self.rec_path}: file is empty")
            with open(self.rec_path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def _word_view(self) -> np.ndarray:
        if self._words is None:
            self._words = np.frombuffer(self._map(), dtype="<u4", count=self._size // 4)
        return self._words

    def _read_payload(self, key: int, offset: int) -> bytes:
        """One record's payload, its parts joined with the magic word re-inserted (dmlc ``NextRecord``).

        Broken framing raises :class:`DataError` (not a skippable :class:`CorruptRecordError`): it means
        train.idx and train.rec disagree, which stops the run at once, naming the record.
        """
        mm = self._map()
        parts: list[bytes] = []
        pos = offset
        while True:
            if pos + 8 > self._size:
                raise self._truncated(key, offset, pos + 8)
            magic, lrec = struct.unpack_from("<II", mm, pos)
            if magic != MAGIC:
                where = "" if pos == offset else f" (continuation of the record at byte {offset})"
                raise DataError(
                    f"{self.rec_path}: no RecordIO magic number at byte {pos}{where} (key {key}); "
                    "train.idx and train.rec disagree or the file is corrupt"
                )
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if (cflag in (2, 3)) != bool(parts) or cflag > 3:
                raise DataError(
                    f"{self.rec_path}: record key {key} at byte {pos} has continuation flag {cflag} out of sequence"
                )
            start = pos + 8
            if start + length > self._size:
                raise self._truncated(key, offset, start + length)
            parts.append(mm[start : start + length])
            if cflag in (0, 3):
                return parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)
            pos = start + ((length + 3) & ~3)

    def _truncated(self, key: int, offset: int, need: int) -> DataError:
        """A record that ends past the end of train.rec: almost always a download or copy that stopped early."""
        return DataError(
            f"{self.rec_path}: is {self._size} bytes but {self.idx_path.name} expects at least {need} bytes (record "
            f"key {key} at byte {offset}): truncated download or copy? Fetch it again (if the file is complete, "
            f"{self.idx_path.name} belongs to another train.rec)"
        )

    def _unpack(self, key: int, payload: bytes) -> tuple[IRHeader, bytes]:
        try:
            return unpack_payload(payload)
        except CorruptRecordError as e:  # a header that does not fit its payload: the file is corrupt, stop
            raise DataError(f"{self.rec_path}: record key {key}: {e}") from None

    def read_raw(self, i: int) -> tuple[bytes, int]:
        """``(encoded image bytes, label)`` of item ``i``, without decoding; the label is the record's own."""
        i = self._check_index(i)
        key = int(self.keys[i])
        header, image = self._unpack(key, self._read_payload(key, int(self._offsets[i])))
        check_image_size(image, key, str(self.rec_path))  # here too: the loader decodes raw bytes itself
        return image, int(header.class_label)

    def decode(self, i: int) -> torch.Tensor:
        """Item ``i`` decoded to a ``uint8`` RGB tensor (3, H, W), without the transform."""
        data, _ = self.read_raw(i)
        return decode_image_bytes(data, key=int(self.keys[self._check_index(i)]), source=str(self.rec_path))

    def __getitem__(self, i: int) -> tuple[Any, int]:
        i = self._check_index(i)
        data, label = self.read_raw(i)
        image = decode_image_bytes(data, key=int(self.keys[i]), source=str(self.rec_path))
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __len__(self) -> int:
        return len(self.keys)

    def _check_index(self, i: int) -> int:
        n = len(self.keys)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        return i % n

    def __getstate__(self) -> dict[str, Any]:
        # The memory map does not pickle; each worker process maps the file again on first read.
        state = self.__dict__.copy()
        state["_mm"] = None
        state["_words"] = None
        return state

    def __repr__(self) -> str:
        return f"RecordIODataset({str(self.root)!r}, images={len(self)}, num_classes={self.num_classes})"


class _KeyTable:
    """key -> offset lookups without a 5M-entry dict: direct when keys are 0..N-1, else binary search."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, source: Path) -> None:
        self._source = source
        self._dense = bool(keys[0] == 0 and np.array_equal(keys, np.arange(len(keys), dtype=np.int64)))
        if self._dense:
            self._sorted_keys, self._sorted_offsets = keys, offsets
            return
        order = np.argsort(keys, kind="stable")
        self._sorted_keys, self._sorted_offsets = keys[order], offsets[order]
        dup = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
        if dup.size:
            raise DataError(f"{source}: key {int(self._sorted_keys[dup[0]])} appears more than once")

    def has(self, key: int) -> bool:
        pos = int(np.searchsorted(self._sorted_keys, key))
        return pos < len(self._sorted_keys) and int(self._sorted_keys[pos]) == key

    def offset(self, key: int) -> int:
        return int(self.lookup(np.array([key], dtype=np.int64), "looked up")[0])

    def lookup(self, keys: np.ndarray, why: str) -> np.ndarray:
        if self._dense:
            pos = keys
            found = (keys >= 0) & (keys < len(self._sorted_keys))
        else:
            pos = np.searchsorted(self._sorted_keys, keys)
            found = pos < len(self._sorted_keys)
            found[found] = self._sorted_keys[pos[found]] == keys[found]
        if not found.all():
            missing = int(keys[np.flatnonzero(~found)[0]])
            raise DataError(f"{self._source}: has no key {missing}, which {why}")
        return self._sorted_offsets[pos]


def _resolve_paths(path: Path) -> tuple[Path, Path, Path]:
    """``(folder, train.rec, train.idx)`` from a folder or a ``.rec`` path, with one-line errors."""
    if not path.exists():
        raise DataError(f"{path}: no such data folder")
    if path.is_file():
        if path.suffix != ".rec":
            raise DataError(f"{path}: expected a RecordIO folder or a .rec file")
        root, rec = path.parent, path
    else:
        root, rec = path, path / "train.rec"
    idx = rec.with_suffix(".idx")
    if not rec.is_file():
        raise DataError(f"{rec}: missing (a RecordIO folder holds train.rec, train.idx and property)")
    if not idx.is_file():
        raise DataError(f"{idx}: missing (the index of {rec.name}; without it records cannot be addressed)")
    return root, rec, idx


# ------------------------------------------------------------------------------------------------- writer


# what a previous pack holds (train.idx.npz: the index cache older versions wrote beside the data)
PACK_FILES = ("train.rec", "train.idx", "property")


def check_pack_output(out_dir: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> bool:
    """Whether ``out_dir`` holds a previous pack that ``overwrite`` replaces; DataError (one line) for a non-empty
    folder without ``overwrite``, or one that holds other files (a dataset's ``.bin`` sets, anything of the user's)."""
    return replaceable_folder(
        out_dir, overwrite, what="RecordIO pack", required=PACK_FILES[:2], allowed=(*PACK_FILES, "train.idx.npz"),
        flag=flag, error=DataError,
    )  # fmt: skip


class RecordIOWriter:
    """Write an InsightFace RecordIO folder that this reader and mxnet's ``MXIndexedRecordIO`` accept.

    Layout (as insightface's ``face2rec2.py`` packs MS1M): record 0 is the header ``[a, b]``; image
    records ``1..a-1`` carry IRHeader flag 0 and a scalar float label; identity records ``a..b-1``
    (identity j = class j) carry ``[start, end)`` of that class's image keys; ``property`` holds
    ``num_classes,height,width``.

    Images are written as they come, so memory stays constant: the input must therefore be **grouped
    by label** (each label's images consecutive; the groups may come in any order). A label that
    returns after another label raises :class:`DataError`. Classes below ``num_classes`` that get no
    image receive an empty identity range ``[0, 0)``.

    Everything is written into a temporary sibling folder that is renamed to ``out_dir`` on
    :meth:`close`, so an interrupted pack never leaves a half dataset. Use as a context manager::

        with RecordIOWriter(out) as w:
            w.add(jpeg_bytes, label)
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        num_classes: int | None = None,
        image_size: tuple[int, int] | None = (112, 112),
        quality: int = 95,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.num_classes = num_classes
        self.image_size = tuple(image_size) if image_size is not None else None
        self.quality = int(quality)
        self.overwrite = overwrite
        check_pack_output(self.out_dir, overwrite, flag="overwrite=True")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".tmp", dir=self.out_dir.parent))
        os.chmod(self._tmp, output_mode(folder=True))  # mkdtemp makes a private folder; give it the usual mode
        self._rec = open(self._tmp / "train.rec", "wb")
        self._idx = open(self._tmp / "train.idx", "w")
        # The header's payload has a fixed size (IRHeader + 2 float32), so reserve it first and fill it in
        # at close: record 0 then physically leads the file, as in insightface's packs.
        self._write(0, pack_payload((0.0, 0.0), b""))
        self._next_key = 1
        self._ranges: dict[int, list[int]] = {}
        self._current: int | None = None
        self._seen_size: tuple[int, int] | None = None
        self._closed = False

    def _write(self, key: int, payload: bytes) -> None:
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        self._rec.write(frame_record(payload))

    def add(self, image: bytes | bytearray | memoryview | torch.Tensor | np.ndarray, label: int) -> int:
        """Append one image; returns its record key.

        ``image``: encoded bytes (JPEG stored as is; PNG and others are re-encoded to JPEG), a ``uint8``
        tensor (C, H, W) or (H, W), or a ``uint8`` numpy array (H, W, C) or (H, W). Arrays must match
        ``image_size``; encoded bytes are not decoded to check (callers that need it, such as
        :func:`timmface.data.tools.pack_image_folder`, check themselves).
        """
        if self._closed:
            raise DataError(f"{self.out_dir}: writer is closed")
        label = int(label)
        if label < 0 or (self.num_classes is not None and label >= self.num_classes) or label >= _FLOAT_EXACT:
            limit = self.num_classes if self.num_classes is not None else _FLOAT_EXACT
            raise DataError(f"{self.out_dir}: label {label} of image {self._next_key} is outside [0, {limit})")
        if label != self._current:
            if label in self._ranges:
                raise DataError(
                    f"{self.out_dir}: label {label} returns at image {self._next_key} after other labels; "
                    "images must be grouped by label (sort the input by label)"
                )
            self._ranges[label] = [self._next_key, self._next_key]
            self._current = label
        if self._next_key + len(self._ranges) + 1 >= _FLOAT_EXACT:
            raise DataError(f"{self.out_dir}: more than {_FLOAT_EXACT} records cannot be addressed by float32 labels")
        key = self._next_key
        self._write(key, pack_payload(float(label), self._encode(image, key), id=key))
        self._ranges[label][1] = key + 1
        self._next_key += 1
        return key

    def _encode(self, image: Any, key: int) -> bytes:
        from torchvision.io import encode_jpeg

        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            if data[:3] == b"\xff\xd8\xff":
                return data
            image = decode_image_bytes(data, key=key, source=str(self.out_dir))
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image))
            image = image.permute(2, 0, 1) if image.ndim == 3 else image
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim not in (2, 3):
            raise DataError(f"{self.out_dir}: image {key} must be encoded bytes or a uint8 (C, H, W) tensor")
        if image.ndim == 2:
            image = image.unsqueeze(0)
        if image.shape[0] not in (1, 3):
            raise DataError(f"{self.out_dir}: image {key} has {image.shape[0]} channels; expected 1 or 3")
        size = (int(image.shape[1]), int(image.shape[2]))
        if self.image_size is not None and size != self.image_size:
            raise DataError(f"{self.out_dir}: image {key} is {size[0]}x{size[1]}, expected {self.image_size}")
        self._seen_size = self._seen_size or size
        return bytes(encode_jpeg(image.contiguous(), quality=self.quality).numpy())

    def close(self) -> Path:
        """Write identity records, the header, ``property`` and move the folder into place."""
        if self._closed:
            return self.out_dir
        try:
            if self._next_key == 1:
                raise DataError(f"{self.out_dir}: no images were added")
            num_classes = self.num_classes if self.num_classes is not None else max(self._ranges) + 1
            a = self._next_key
            for j in range(num_classes):
                start, end = self._ranges.get(j, (0, 0))
                self._write(a + j, pack_payload((float(start), float(end)), b"", id=a + j))
            self._rec.seek(0)
            self._rec.write(frame_record(pack_payload((float(a), float(a + num_classes)), b"")))
            self._rec.close()
            self._idx.close()
            h, w = self.image_size or self._seen_size or (112, 112)
            (self._tmp / "property").write_text(f"{num_classes},{h},{w}\n")
            if self.out_dir.exists():
                shutil.rmtree(self.out_dir) if self.out_dir.is_dir() else self.out_dir.unlink()
            os.replace(self._tmp, self.out_dir)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far."""
        self._closed = True
        for f in (self._rec, self._idx):
            f.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def num_images(self) -> int:
        return self._next_key - 1
