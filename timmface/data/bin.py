"""Verification ``.bin`` files (lfw, cfp_fp, agedb_30, calfw, cplfw, ...): read safely, write, decode.

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` holds 2N encoded images (pair i = images
2i and 2i+1) and ``issame_list`` N bools (``/work/shared/REFERENCE.md``). The published files were
written by Python 2 (protocol 2, images as ``BINSTRING``); newer ones by Python 3. Some of
insightface's own packing scripts append ``cv2.imencode`` output, so images may also be numpy
``uint8`` arrays, and ``issame`` may be a numpy bool array.

Unpickling runs arbitrary code in general, so :func:`read_bin` uses a restricted unpickler: every
global is refused except a handful of stand-ins that can only build bytes and ``uint8``/``bool``
arrays (``_codecs.encode``, ``bytes``, ``bytearray`` as Python 3 writes bytes under protocol 2, and
numpy's array and dtype reconstructors). The numpy stand-ins never hand pickle state to numpy: they
check it and build the array themselves with ``np.frombuffer``.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from timmface.errors import CorruptRecordError, DataError
from timmface.fileio import atomic_write

_ALLOWED_DTYPES = {"u1": np.dtype(np.uint8), "|u1": np.dtype(np.uint8), "b1": np.dtype(bool), "|b1": np.dtype(bool)}
_LATIN1 = {"latin1", "latin-1", "iso-8859-1"}


class _Refused(Exception):
    """Raised inside the unpickler; turned into a one-line DataError naming the file."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)


class _Dtype:
    """Stands for ``numpy.dtype(name)`` of a uint8 or bool dtype while unpickling."""

    def __init__(self, name: Any, align: Any = False, copy: Any = False) -> None:
        key = _text(name)
        if key not in _ALLOWED_DTYPES:
            raise _Refused(f"numpy.dtype({key!r})")
        self.dtype = _ALLOWED_DTYPES[key]

    def __setstate__(self, state: Any) -> None:
        # (version, endian, subarray, names, fields, elsize, alignment, flags): a plain 1-byte dtype has
        # no subarray, names or fields; anything else could redefine the dtype, so refuse it.
        if not isinstance(state, tuple) or len(state) < 5 or any(x is not None for x in state[2:5]):
            raise _Refused("numpy.dtype with a structured state")


class _Array:
    """Stands for ``numpy.ndarray`` rebuilt through ``_reconstruct`` + ``__setstate__``."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused("numpy.ndarray with an unknown state")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _build_array(raw, dtype, shape, "F" if fortran else "C")


def _build_array(raw: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, _Dtype):
        raise _Refused("numpy.ndarray without a checked dtype")
    if isinstance(raw, str):
        raw = raw.encode("latin-1")  # Python 2 array data read with a text encoding
    if not isinstance(raw, (bytes, bytearray)):
        raise _Refused("numpy.ndarray whose data are not bytes")
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape)) if shape else 1
    if count * dtype.dtype.itemsize != len(raw):
        raise _Refused("numpy.ndarray whose data do not match its shape")
    return np.frombuffer(bytes(raw), dtype=dtype.dtype).reshape(shape, order="F" if _text(order) == "F" else "C")


_NDARRAY = object()  # what `numpy.ndarray` resolves to: only a token for `_reconstruct`, never callable


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _Array:
    if subtype is not _NDARRAY:
        raise _Refused("numpy.core.multiarray._reconstruct of a non-ndarray")
    return _Array()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _build_array(buf, dtype, shape, order)  # protocol 5 form of an array


def _scalar(dtype: Any, data: Any = b"") -> bool:
    if not isinstance(dtype, _Dtype) or dtype.dtype != np.dtype(bool):
        raise _Refused("numpy scalar that is not a bool")
    data = data.encode("latin-1") if isinstance(data, str) else data
    if not isinstance(data, (bytes, bytearray)) or len(data) != 1:
        raise _Refused("numpy bool scalar with bad data")
    return bool(data[0])


def _encode(obj: Any, encoding: Any = "utf-8") -> bytes:
    # Python 3 writes `bytes` under protocol 2 as `_codecs.encode(text, "latin1")`.
    if not isinstance(obj, str) or _text(encoding).lower() not in _LATIN1:
        raise _Refused("_codecs.encode other than latin-1 text")
    return obj.encode("latin-1")


def _bytes(*args: Any) -> bytes:
    # `bytes()` (protocol 2 empty bytes) and `bytearray(text, "latin-1")`; never `bytes(n)` (n zero bytes).
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    if len(args) == 2 and isinstance(args[0], str) and _text(args[1]).lower() in _LATIN1:
        return args[0].encode("latin-1")
    raise _Refused("bytes() with unexpected arguments")


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _encode,
    ("__builtin__", "bytes"): _bytes,
    ("builtins", "bytes"): _bytes,
    ("__builtin__", "bytearray"): _bytes,
    ("builtins", "bytearray"): _bytes,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class _BinUnpickler(pickle.Unpickler):
    """Refuses every global but the stand-ins above; Python 2 strings come back as bytes."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        safe = _SAFE_GLOBALS.get((module, name))
        if safe is None:
            raise _Refused(f"{module}.{name}")
        return safe

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes (in pure Python, over bytes in memory) before the C unpickler sees them.

    The C unpickler (Python 3.11) allocates a string's or frame's claimed length, and grows its memo to a
    ``LONG_BINPUT`` index, *before* it reads any data: a 20-byte file can ask for terabytes (fuzzing found
    BINBYTES8, BINUNICODE8, FRAME and LONG_BINPUT). ``pickletools.genops`` reads each argument with
    ``BytesIO.read``, which returns at most what the file holds, and raises ValueError when it is short.
    Memo indices must stay below the number of opcodes seen: a pickler numbers them 0, 1, 2, ...
    """
    count = 0
    for opcode, arg, _ in pickletools.genops(data):
        count += 1
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > count:
            raise ValueError(f"memo index {arg} at opcode {count}")
        if opcode.name == "STOP":
            return


def _as_image(item: Any) -> bytes | None:
    if isinstance(item, _Array):
        item = item.array
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):
        return item.encode("latin-1")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()  # cv2.imencode output, shape (n,) or (n, 1)
    return None


def _as_flags(value: Any) -> list[bool] | None:
    if isinstance(value, _Array):
        value = value.array
    if isinstance(value, np.ndarray):
        return [bool(v) for v in value.ravel()] if value.dtype == np.dtype(bool) else None
    if not isinstance(value, (list, tuple)):
        return None
    flags = []
    for v in value:
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, int) and v in (0, 1)):
            flags.append(bool(v))
        else:
            return None
    return flags


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """``(images, issame)``: 2N encoded images and N pair labels from a verification ``.bin``.

    Raises :class:`DataError` naming the file when it is missing, is not such a pickle, holds anything
    but bytes/lists/bools (nothing else is ever constructed) or has a count mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such verification file")
    try:
        data = path.read_bytes()
        _check_opcodes(data)
        obj = _BinUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise DataError(
            f"{path}: refused to unpickle {e.what}: .bin files may only contain bytes, lists and bools"
        ) from None
    except Exception as e:  # a truncated or foreign file raises any of several pickle/struct errors
        raise DataError(f"{path}: not a verification .bin pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    raw_images, raw_issame = obj
    if not isinstance(raw_images, (list, tuple)):
        raise DataError(f"{path}: images must be a list, got {type(raw_images).__name__}")
    images = [_as_image(x) for x in raw_images]
    bad = next((i for i, x in enumerate(images) if x is None), None)
    if bad is not None:
        raise DataError(f"{path}: image {bad} is a {type(raw_images[bad]).__name__}, not encoded bytes")
    issame = _as_flags(raw_issame)
    if issame is None:
        raise DataError(f"{path}: issame must be a list of bools")
    if len(images) != 2 * len(issame):
        raise DataError(f"{path}: {len(images)} images for {len(issame)} pair labels (expected {2 * len(issame)})")
    return images, issame  # type: ignore[return-value]


def _pickle_py2(images: Sequence[bytes], issame: Sequence[bool]) -> bytes:
    """The bytes Python 2's pickler writes for ``(list_of_str, list_of_bool)`` under protocol 2:
    images as ``SHORT_BINSTRING``/``BINSTRING``, appended in batches of 1000 as cPickle does."""
    out = bytearray(b"\x80\x02")  # PROTO 2

    def save_list(items: list[bytes]) -> None:
        out.extend(b"]")  # EMPTY_LIST
        for start in range(0, len(items), 1000):
            batch = items[start : start + 1000]
            out.extend(b"(")  # MARK
            for item in batch:
                out.extend(item)
            out.extend(b"e")  # APPENDS

    encoded = [
        (b"U" + bytes([len(x)]) if len(x) < 256 else b"T" + struct.pack("<i", len(x))) + bytes(x) for x in images
    ]
    save_list(encoded)
    save_list([b"\x88" if s else b"\x89" for s in issame])  # NEWTRUE / NEWFALSE
    out.extend(b"\x86.")  # TUPLE2, STOP
    return bytes(out)


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool], protocol: int = 2) -> Path:
    """Write a verification ``.bin``: ``images`` 2N encoded images, ``issame`` N bools.

    ``protocol=2`` writes exactly what Python 2 wrote for the published files (readable by
    insightface's ``load_bin`` under Python 2 and 3); higher protocols use Python 3's pickler.
    The file is written atomically (temporary file, then rename).
    """
    path = Path(path)
    images = [bytes(x) for x in images]
    flags = [bool(s) for s in issame]
    if len(images) != 2 * len(flags):
        raise DataError(f"{path}: {len(images)} images for {len(flags)} pair labels (expected {2 * len(flags)})")
    data = _pickle_py2(images, flags) if protocol == 2 else pickle.dumps((images, flags), protocol=protocol)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(data)
    return path


class VerificationSet:
    """A ``.bin`` verification set whose images decode to ``uint8`` RGB tensors of ``image_size``.

    ``len(vs)`` is the number of pairs; :meth:`batches` yields (B, 3, H, W) ``uint8`` tensors of the
    2N images in file order (so pair i is rows 2i and 2i+1); ``issame`` is a bool tensor (N,).
    """

    def __init__(self, path: str | os.PathLike, image_size: tuple[int, int] = (112, 112)) -> None:
        self.path = Path(path)
        self.name = self.path.stem
        self.image_size = tuple(image_size)
        self.images, flags = read_bin(self.path)
        self.issame = torch.tensor(flags, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.issame)

    def decode(self, i: int) -> torch.Tensor:
        """Image ``i`` (of 2N) as a ``uint8`` (3, H, W) tensor, resized to ``image_size`` if needed."""
        from timmface.data.image import decode_image_bytes

        try:
            img = decode_image_bytes(self.images[i], key=i, source=str(self.path))
        except CorruptRecordError as e:
            raise DataError(str(e)) from None  # a pair cannot be skipped without changing the protocol
        if tuple(img.shape[1:]) != self.image_size:
            from torchvision.transforms.v2 import functional as TF

            img = TF.resize(img, list(self.image_size), antialias=True)
        return img

    def batches(self, batch_size: int = 256) -> Iterator[torch.Tensor]:
        """All 2N images in order, ``batch_size`` at a time, as ``uint8`` (B, 3, H, W)."""
        for start in range(0, len(self.images), batch_size):
            stop = min(start + batch_size, len(self.images))
            yield torch.stack([self.decode(i) for i in range(start, stop)])

    def decode_all(self) -> torch.Tensor:
        """Every image, ``uint8`` (2N, 3, H, W)."""
        return torch.cat(list(self.batches()), dim=0) if self.images else torch.empty(0, 3, *self.image_size)
