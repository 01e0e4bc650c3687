"""Property-based fuzzing of everything timmface reads from disk or the command line.

Each reader gets random bytes and random mutations (byte flips, insertions, truncations) of a valid
input. The property: the input parses, or the reader raises one of the project's own errors
(:class:`~timmface.errors.TimmfaceError`) with a message -- never a hang, a crash, an unrelated
exception (IndexError, struct.error, UnicodeDecodeError, OverflowError, MemoryError, RecursionError,
...) or an attempt to allocate a buffer sized by a field of the file. Size fields that claim far more
bytes than the file holds are part of every strategy below (``_HUGE``).

Examples are bounded (``max_examples``; ``no_hang`` for time) so the whole file runs in well under a minute on
two cores; ``derandomize`` makes CI runs repeatable (a new example set needs a new seed, not luck).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from timmface.errors import TimmfaceError

FUZZ = settings(
    max_examples=int(os.environ.get("TIMMFACE_FUZZ_EXAMPLES", "100")),
    deadline=None,  # hangs are caught by no_hang(); a per-example deadline only measures the machine's load
    derandomize=not os.environ.get("TIMMFACE_FUZZ_EXAMPLES"),  # a longer local hunt draws new examples
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no "explain": it traces every line
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_HUGE = [2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1]  # size fields that must be compared with the file first


@contextlib.contextmanager
def no_hang(seconds: int = 10) -> Iterator[None]:
    """Fail (instead of hanging the suite) when one example takes longer than ``seconds``."""

    def alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"reader did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def parses_or_own_error(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a TimmfaceError with a one-line message is fine, anything else fails the test."""
    with no_hang():
        try:
            return fn(*args, **kwargs)
        except TimmfaceError as e:
            message = str(e)
            assert message.strip(), f"{type(e).__name__} without a message"
            assert "\n" not in message.strip(), f"multi-line message: {message!r}"
            return e


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a few random edits: byte overwrites, 4-byte size fields set huge, inserts, a truncation."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "word", "insert", "delete", "truncate"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "word":
            value = draw(st.sampled_from([0, 1, 0xFF, *_HUGE]))
            size = draw(st.sampled_from([2, 4, 8]))
            data[pos : pos + size] = (value % 2 ** (8 * size)).to_bytes(size, draw(st.sampled_from(["little", "big"])))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


def bytes_or_mutation(valid: bytes, max_random: int = 256) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=max_random), mutated(valid))


# --------------------------------------------------------------------------------------------------
# RecordIO: payloads, train.idx, whole folders (train.rec / train.idx / property / the index cache)
# --------------------------------------------------------------------------------------------------


def _tiny_jpeg(seed: int) -> bytes:
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    return bytes(encode_jpeg(torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)).numpy())


def _valid_payload() -> bytes:
    from timmface.data.recordio import pack_payload

    return pack_payload((3.0, 4.0), _tiny_jpeg(0), id=7)


@FUZZ
@given(data=bytes_or_mutation(_valid_payload()))
@example(data=struct.pack("<IfQQ", 2**32 - 1, 0.0, 0, 0))  # announces 4 G labels in a 24-byte payload
def test_unpack_payload(data: bytes) -> None:
    from timmface.data.recordio import IRHeader, unpack_payload

    got = parses_or_own_error(unpack_payload, data)
    if not isinstance(got, Exception):
        header, image = got
        assert isinstance(header, IRHeader) and len(header.labels) == header.flag and isinstance(image, bytes)


def _valid_idx() -> bytes:
    return b"".join(f"{k}\t{8 * k}\n".encode() for k in range(6))


@FUZZ
@given(data=st.one_of(bytes_or_mutation(_valid_idx()), st.text("0123456789\t\n -x", max_size=80).map(str.encode)))
@example(data=b"0\t99999999999999999999\n")  # a number past int64 (numpy's fast parser would clamp it)
@example(data=b"0\t99999999999999999999\n1\t-\n")
@example(data=b"-5\t8\n")
def test_parse_idx(data: bytes) -> None:
    from timmface.data.recordio import parse_idx

    got = parses_or_own_error(parse_idx, data, "train.idx")
    if not isinstance(got, Exception):
        keys, offsets = got
        assert keys.dtype == offsets.dtype == np.int64 and keys.shape == offsets.shape
        assert (offsets >= 0).all()


@pytest.fixture(scope="module")
def rec_folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The three files of a valid 6-image RecordIO folder (header, identity records, 8x8 JPEGs)."""
    from timmface.data.recordio import RecordIOWriter

    root = tmp_path_factory.mktemp("rec") / "toy"
    with RecordIOWriter(root, num_classes=3, image_size=(8, 8)) as w:
        for i in range(6):
            w.add(_tiny_jpeg(i), i // 2)
    return {name: (root / name).read_bytes() for name in ("train.rec", "train.idx", "property")}


def _read_everything(root: Path, index_cache: bool = False) -> None:
    """Open the folder and read every record the way training does (raw bytes, then decode)."""
    from timmface.data.recordio import RecordIODataset
    from timmface.errors import CorruptRecordError

    ds = RecordIODataset(root, index_cache=index_cache, cache_dir=root / "cache")
    assert len(ds.keys) == len(ds.labels) and ds.num_classes >= 1
    for i in range(len(ds)):
        try:
            image = ds.decode(i)
        except CorruptRecordError:  # skipped and counted by the loader
            continue
        assert image.dtype == torch.uint8 and image.shape[0] == 3


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


_REC_FILES = ["train.rec", "train.idx", "property"]


@FUZZ
@given(data=st.data(), which=st.sampled_from(_REC_FILES))
def test_recordio_folder(rec_folder: dict[str, bytes], data: st.DataObject, which: str) -> None:
    files = dict(rec_folder)
    files[which] = data.draw(mutated(files[which]) if which != "property" else bytes_or_mutation(files[which], 24))
    with tempfile.TemporaryDirectory() as tmp:
        parses_or_own_error(_read_everything, _write_folder(Path(tmp) / "toy", files))


def test_recordio_header_and_image_size_fields(rec_folder: dict[str, bytes], tmp_path: Path) -> None:
    """Size fields set to huge values on purpose (random edits rarely hit them): the header record's key
    range, ``property``'s class count and image size, a JPEG's frame size, the index cache."""
    from timmface.data.recordio import _LENGTH_MASK, MAGIC, frame_record, pack_payload

    rec = rec_folder["train.rec"]
    header_len = struct.unpack_from("<I", rec, 4)[0] & _LENGTH_MASK
    cases: dict[str, dict[str, bytes]] = {}
    for a, b in [(float("inf"), float("inf")), (float("nan"), 9.0), (1e30, 1e30), (2.0**40, 2.0**40 + 1)]:
        first = frame_record(pack_payload((a, b), b""))
        assert len(first) == 8 + header_len and struct.unpack_from("<I", first)[0] == MAGIC
        cases[f"header {a},{b}"] = {**rec_folder, "train.rec": first + rec[len(first) :]}
    for prop in (b"99999999999999999999,8,8\n", b"3,99999999,99999999\n", b"3,8\n", b"\xff\xfe,1,1"):
        cases[f"property {prop!r}"] = {**rec_folder, "property": prop}
    jpeg = _tiny_jpeg(0)
    sof = jpeg.find(b"\xff\xc0")
    bomb = jpeg[: sof + 5] + struct.pack(">HH", 60000, 60000) + jpeg[sof + 9 :]  # decodes to 10.8 GB
    big = rec.replace(jpeg, bomb, 1)
    assert big != rec
    cases["jpeg frame 60000x60000"] = {**rec_folder, "train.rec": big}
    for name, files in cases.items():
        root = _write_folder(tmp_path / name.replace(" ", "_").replace("'", ""), files)
        got = parses_or_own_error(_read_everything, root)
        assert name.startswith("jpeg") or isinstance(got, TimmfaceError), name
    # the decoded-size check itself, for JPEG, PNG, GIF and WebP headers
    from timmface.data.image import decode_image_bytes
    from timmface.errors import CorruptRecordError

    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 2**20, 2**20) + b"\x08\x02\0\0\0"
    gif = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\0" * 20
    webp = b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10) + b"\0" * 4 + b"\xff" * 6
    for blob in (bomb, png, gif, webp):
        with pytest.raises(CorruptRecordError, match="decoding would need"):
            decode_image_bytes(blob, key=1, source="x")


@FUZZ
@given(data=st.data())
def test_recordio_index_cache(rec_folder: dict[str, bytes], data: st.DataObject) -> None:
    """A damaged index cache is ignored and rebuilt, never trusted or fatal."""
    from timmface.data.recordio import index_cache_path

    with tempfile.TemporaryDirectory() as tmp:
        root = _write_folder(Path(tmp) / "toy", rec_folder)
        _read_everything(root, index_cache=True)  # writes the cache
        cache = index_cache_path(root / "train.idx", root / "cache")
        cache.write_bytes(data.draw(mutated(cache.read_bytes())))
        got = parses_or_own_error(_read_everything, root, index_cache=True)
        assert not isinstance(got, Exception)  # the index itself is fine: the cache must not matter


# --------------------------------------------------------------------------------------------------
# Verification .bin pickles
# --------------------------------------------------------------------------------------------------


def _valid_bins() -> list[bytes]:
    from timmface.data.bin import _pickle_py2

    images, issame = [b"a" * 3, b"b" * 300, b"c", b"d"], [True, False]
    arrays = ([np.frombuffer(b"xy", np.uint8), np.frombuffer(b"z", np.uint8)], np.array([True]))
    return [
        _pickle_py2(images, issame),
        pickle.dumps((images, issame), protocol=2),
        pickle.dumps((images, issame), protocol=5),
        pickle.dumps(arrays, protocol=2),
        pickle.dumps(arrays, protocol=5),
    ]


def _read_bin_bytes(blob: bytes) -> Any:
    from timmface.data.bin import read_bin

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.bin"
        path.write_bytes(blob)
        return parses_or_own_error(read_bin, path)


@FUZZ
@given(data=st.data(), which=st.integers(0, len(_valid_bins()) - 1))
def test_read_bin(data: st.DataObject, which: int) -> None:
    got = _read_bin_bytes(data.draw(bytes_or_mutation(_valid_bins()[which])))
    if not isinstance(got, Exception):
        images, issame = got
        assert all(type(x) is bytes for x in images) and len(images) == 2 * len(issame)


@pytest.mark.parametrize(
    "blob",
    [
        b"\x80\x02T" + struct.pack("<i", 2**31 - 1) + b"x.",  # BINSTRING of 2 GB in a 9-byte file
        b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"x.",  # BINBYTES8
        b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"x.",  # BINUNICODE8
        b"\x80\x02]r" + struct.pack("<I", 2**30) + b".",  # LONG_BINPUT: a memo of 2**30 entries
        b"\x80\x02\x8b" + struct.pack("<i", 2**31 - 1) + b"x.",  # LONG4
        b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"x.",  # FRAME
    ],
    ids=["binstring", "binbytes8", "binunicode8", "long_binput", "long4", "frame"],
)
def test_read_bin_size_fields(blob: bytes) -> None:
    assert isinstance(_read_bin_bytes(blob), TimmfaceError)


# --------------------------------------------------------------------------------------------------
# Configs: YAML files and dotted overrides
# --------------------------------------------------------------------------------------------------

_KEYS = [
    "total_steps", "optim.lr", "optim.grad_accum", "batch_size", "model.kwargs", "data.augmentations", "loss.name",
    "base", "optim.betas", "ema.decay", "head", "output_dir", "data.max_bad_fraction", "x.y",
]  # fmt: skip
_YAML_VALUES = st.one_of(
    st.sampled_from([
        "0", "-1", "1e400", "9" * 400, ".nan", ".inf", "[", "{a: [}", "!!python/object/apply:os.system [x]",
        "&a [*a]", "[" * 2000 + "]" * 2000, "'\\0'", "~", "yes", "{}", "[1, 2]", "0x10", "1_000",
    ]),
    st.text(max_size=20),
)  # fmt: skip


@FUZZ
@given(lines=st.lists(st.tuples(st.sampled_from(_KEYS), _YAML_VALUES), max_size=4), junk=st.binary(max_size=40))
@example(lines=[("optim.grad_accum", "0")], junk=b"")
@example(lines=[("base", "'a\\0b'")], junk=b"")
def test_load_config_file(lines: list[tuple[str, str]], junk: bytes) -> None:
    from timmface.config import Config, load_config

    text = "".join(f"{key}: {value}\n" for key, value in lines).encode() + junk
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(text)
        got = parses_or_own_error(load_config, path)
    assert isinstance(got, (Config, TimmfaceError))


@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(_KEYS), _YAML_VALUES), max_size=4), raw=st.text(max_size=30))
@example(overrides=[("optim.lr", "9" * 400)], raw="")
@example(overrides=[("model.kwargs", "{a: " + "[" * 3000 + "]" * 3000 + "}")], raw="")
def test_load_config_overrides(overrides: list[tuple[str, str]], raw: str) -> None:
    from timmface.config import Config, load_config

    got = parses_or_own_error(load_config, None, [f"{k}={v}" for k, v in overrides] + ([raw] if raw else []))
    assert isinstance(got, (Config, TimmfaceError))


# --------------------------------------------------------------------------------------------------
# Checkpoints and teacher files
# --------------------------------------------------------------------------------------------------


def _valid_checkpoint(legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    obj = {"format": "timmface", "version": 1, "step": 3, "config": {"model": {"backbone": "test_vit"}},
           "model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}}  # fmt: skip
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _load_checkpoint_bytes(blob: bytes, mmap: bool) -> Any:
    from timmface.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step_00000003.pt"
        path.write_bytes(blob)
        return parses_or_own_error(load_checkpoint, path, mmap=mmap)


@FUZZ
@given(data=st.data(), legacy=st.booleans(), mmap=st.booleans())
def test_load_checkpoint(data: st.DataObject, legacy: bool, mmap: bool) -> None:
    got = _load_checkpoint_bytes(data.draw(bytes_or_mutation(_valid_checkpoint(legacy))), mmap and not legacy)
    if not isinstance(got, Exception):
        assert got["format"] == "timmface"


def test_checkpoint_size_fields() -> None:
    """A zip entry (torch's record) whose size fields claim 2**40 bytes: refused before any allocation."""
    valid = _valid_checkpoint()
    central = valid.rfind(b"PK\x01\x02")  # the last central-directory entry
    for field_offset in (20, 24):  # compressed size, uncompressed size
        for value in (2**32 - 1, 2**31):
            blob = bytearray(valid)
            struct.pack_into("<I", blob, central + field_offset, value)
            assert isinstance(_load_checkpoint_bytes(bytes(blob), mmap=False), TimmfaceError)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["zip", "legacy", "safetensors"]))
def test_load_teacher(data: st.DataObject, kind: str) -> None:
    import teachers

    state = {"conv1.weight": torch.zeros(2, 3, 1, 1), "fc.bias": torch.zeros(2)}
    if kind == "safetensors":
        from safetensors.torch import save

        valid = save(state)
    else:
        buf = io.BytesIO()
        torch.save(state, buf, _use_new_zipfile_serialization=kind == "zip")
        valid = buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "backbone.pth"
        path.write_bytes(data.draw(bytes_or_mutation(valid)))
        parses_or_own_error(teachers.load_teacher, path)


# --------------------------------------------------------------------------------------------------
# The embedding cache header
# --------------------------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from timmface.embedding.cache import create_file

    path = tmp_path_factory.mktemp("emb") / "c.tfemb"
    create_file(path, {"dataset": {"fingerprint": "0" * 16}}, num_records=3, dim=4, views=["a", "b"], dtype="float16")
    return path.read_bytes()


def _header_with(meta: dict[str, Any], body: int, deep: bool = False) -> bytes:
    from timmface.embedding.cache import MAGIC

    text = json.dumps(meta).encode() if not deep else b"[" * 100_000 + b"]" * 100_000
    return MAGIC + struct.pack("<Q", len(text)) + text + bytes(body)


@FUZZ
@given(data=st.data(), mode=st.sampled_from(["bytes", "fields"]))
def test_embedding_cache_header(cache_file: bytes, data: st.DataObject, mode: str) -> None:
    from timmface.embedding.cache import EmbeddingCache

    if mode == "bytes":
        blob = data.draw(mutated(cache_file[:4200]) | mutated(cache_file))
    else:  # valid JSON, wrong values: each field replaced by random JSON
        length = struct.unpack_from("<Q", cache_file, 8)[0]
        meta = json.loads(cache_file[16 : 16 + length])
        for key in data.draw(st.lists(st.sampled_from(sorted(meta)), min_size=1, max_size=3)):
            meta[key] = data.draw(_JSON)
        blob = _header_with(meta, data.draw(st.integers(0, 9000)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.tfemb"
        path.write_bytes(blob)
        got = parses_or_own_error(EmbeddingCache.open, path)
        if not isinstance(got, Exception):
            assert got.missing().size <= got.num_records  # the memory maps open on what the header says
            got.close()


def test_embedding_cache_header_extremes(cache_file: bytes, tmp_path: Path) -> None:
    from timmface.embedding.cache import EmbeddingCache

    length = struct.unpack_from("<Q", cache_file, 8)[0]
    meta = json.loads(cache_file[16 : 16 + length])
    blobs = [
        _header_with(meta, 0, deep=True),  # JSON nested 100k deep
        _header_with([meta], 0),  # type: ignore[arg-type]  # not an object
        _header_with({**meta, "num_records": -1, "done_offset": meta["data_offset"] - 16}, 9000),
        _header_with({**meta, "num_records": "3"}, 9000),
        _header_with({**meta, "views": 2}, 9000),
        _header_with({**meta, "dim": 1e300}, 9000),
        cache_file[:8] + struct.pack("<Q", 2**63 - 1) + cache_file[16:],
    ]
    for i, blob in enumerate(blobs):
        path = tmp_path / f"{i}.tfemb"
        path.write_bytes(blob)
        assert isinstance(parses_or_own_error(EmbeddingCache.open, path), TimmfaceError), i
