"""Verification .bin files: Python 2 pickles, restricted unpickling, writing, decoding."""

from __future__ import annotations

import os
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_jpeg, encode_jpeg

from timmface.data.bin import VerificationSet, read_bin, write_bin
from timmface.errors import DataError


def jpeg(seed: int, h: int = 112, w: int = 112) -> bytes:
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, 4, 4), generator=g, dtype=torch.uint8)
    img = torch.nn.functional.interpolate(small[None].float(), size=(h, w), mode="bilinear")[0].to(torch.uint8)
    return bytes(encode_jpeg(img, quality=90).numpy())


def py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's cPickle writes for ``pickle.dump((images, issame), f, protocol=2)`` with str
    images, opcode by opcode (BINPUT memo entries included), as in the published lfw.bin."""
    out = bytearray(b"\x80\x02")  # PROTO 2
    memo = 0

    def put() -> bytes:
        nonlocal memo
        memo += 1
        return b"q" + bytes([memo - 1])  # BINPUT

    out += b"]" + put() + b"("  # EMPTY_LIST, MARK
    for img in images:
        if len(img) < 256:
            out += b"U" + bytes([len(img)]) + img + put()  # SHORT_BINSTRING
        else:
            out += b"T" + struct.pack("<i", len(img)) + img + put()  # BINSTRING
    out += b"e"  # APPENDS
    out += b"]" + put() + b"(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e"
    out += b"\x86" + put() + b"."  # TUPLE2, STOP
    return bytes(out)


def test_reads_python2_protocol2_pickle(tmp_path: Path) -> None:
    images = [jpeg(0), b"short", jpeg(1), bytes(range(256)) * 2]
    path = tmp_path / "lfw.bin"
    path.write_bytes(py2_pickle(images, [True, False]))
    got_images, issame = read_bin(path)
    assert got_images == images and issame == [True, False]
    assert all(type(x) is bytes for x in got_images)


def test_write_bin_protocol2_is_python2_form(tmp_path: Path) -> None:
    images, issame = [jpeg(0), b"abc", jpeg(2), b"x" * 300], [False, True]
    path = write_bin(tmp_path / "a.bin", images, issame)
    data = path.read_bytes()
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert {"PROTO", "SHORT_BINSTRING", "BINSTRING", "NEWTRUE", "NEWFALSE", "TUPLE2"} <= ops
    assert not ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BINBYTES", "SHORT_BINBYTES"}
    assert pickle.loads(data, encoding="bytes") == (images, issame)  # as insightface's load_bin reads it
    assert read_bin(path) == (images, issame)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_python3_pickles_of_every_protocol(tmp_path: Path, protocol: int) -> None:
    images, issame = [jpeg(0), b"", jpeg(1), b"\x00\xff"], [True, False]
    path = tmp_path / "p.bin"
    path.write_bytes(pickle.dumps((images, issame), protocol=protocol))  # protocol 2 uses _codecs.encode
    assert read_bin(path) == (images, issame)
    write_bin(path, images, issame, protocol=protocol)
    assert read_bin(path) == (images, issame)


@pytest.mark.parametrize("protocol", [2, 5])
def test_numpy_images_and_issame(tmp_path: Path, protocol: int) -> None:
    """cv2.imencode output (uint8 arrays of shape (n, 1)) and a numpy bool issame, as some packing
    scripts wrote them; a list instead of the tuple and str (latin-1) images are accepted too."""
    images = [jpeg(0), jpeg(1)]
    arrays = [np.frombuffer(x, np.uint8).reshape(-1, 1) for x in images]
    path = tmp_path / "n.bin"
    path.write_bytes(pickle.dumps((arrays, np.array([True])), protocol=protocol))
    assert read_bin(path) == (images, [True])
    path.write_bytes(pickle.dumps([arrays, [np.bool_(False)]], protocol=protocol))
    assert read_bin(path) == (images, [False])
    path.write_bytes(pickle.dumps([[x.decode("latin-1") for x in images], [True]], protocol=protocol))
    assert read_bin(path) == (images, [True])


class _Evil:
    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "open":
            return (open, (str(self.marker), "w"))
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["open", "system"])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_refused_and_not_executed(tmp_path: Path, how: str, protocol: int) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Evil(marker, how), b"x"], [True]), protocol=protocol))
    with pytest.raises(DataError) as info:
        read_bin(path)
    assert not marker.exists()
    name = "io.open" if how == "open" else f"{os.system.__module__}.system"
    assert str(info.value) == f"{path}: refused to unpickle {name}: .bin files may only contain bytes, lists and bools"


def test_object_arrays_refused(tmp_path: Path) -> None:
    path = tmp_path / "o.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], np.array([True], dtype=object)), protocol=2))
    with pytest.raises(DataError, match="refused to unpickle numpy.dtype"):
        read_bin(path)


def test_bad_contents(tmp_path: Path) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True]), protocol=2))
    with pytest.raises(DataError, match=r"bad.bin: 3 images for 1 pair labels"):
        read_bin(path)
    path.write_bytes(pickle.dumps(([b"a", b"b"], ["yes"]), protocol=2))
    with pytest.raises(DataError, match=r"bad.bin: issame must be a list of bools"):
        read_bin(path)
    path.write_bytes(pickle.dumps(([b"a", b"b"], [True], [0.1]), protocol=2))
    with pytest.raises(DataError, match=r"bad.bin: expected a pickled \(images, issame\) pair"):
        read_bin(path)
    path.write_bytes(b"\x80\x02]q\x00(U\x03ab")
    with pytest.raises(DataError, match=r"bad.bin: not a verification .bin pickle"):
        read_bin(path)
    with pytest.raises(DataError, match=r"missing.bin: no such verification file"):
        read_bin(tmp_path / "missing.bin")
    with pytest.raises(DataError, match="2 images for 2 pair labels"):
        write_bin(path, [b"a", b"b"], [True, False])


def test_verification_set_decodes_and_resizes(tmp_path: Path) -> None:
    images = [jpeg(0), jpeg(1, 56, 48), jpeg(2), jpeg(3)]
    vs = VerificationSet(write_bin(tmp_path / "v.bin", images, [True, False]))
    assert len(vs) == 2 and vs.name == "v" and vs.issame.tolist() == [True, False]
    first = vs.decode(0)
    assert first.dtype == torch.uint8 and torch.equal(
        first, decode_jpeg(torch.frombuffer(bytearray(images[0]), dtype=torch.uint8))
    )
    assert vs.decode(1).shape == (3, 112, 112)
    batches = list(vs.batches(batch_size=3))
    assert [b.shape[0] for b in batches] == [3, 1]
    assert vs.decode_all().shape == (4, 3, 112, 112)
    broken = write_bin(tmp_path / "broken.bin", [images[0], b"nope"], [True])
    with pytest.raises(DataError, match=r"broken.bin: key 1: cannot decode image"):
        VerificationSet(broken).decode_all()
