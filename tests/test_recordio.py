"""InsightFace RecordIO: a folder built byte by byte here, the writer, the index cache, bad input."""

from __future__ import annotations

import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_jpeg, encode_jpeg

from timmface.data import recordio
from timmface.data.recordio import RecordIODataset, RecordIOWriter, parse_idx
from timmface.errors import CorruptRecordError, DataError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)


def jpeg(seed: int, h: int = 16, w: int = 20, gray: bool = False) -> bytes:
    """A smooth random image (so JPEG keeps its structure) encoded as JPEG."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (1 if gray else 3, 4, 5), generator=g, dtype=torch.uint8)
    img = torch.nn.functional.interpolate(small[None].float(), size=(h, w), mode="bilinear")[0].to(torch.uint8)
    return bytes(encode_jpeg(img, quality=90).numpy())


def decoded(data: bytes) -> torch.Tensor:
    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def ir_header(flag: int, label: float, key: int, labels: tuple[float, ...] = ()) -> bytes:
    return struct.pack("<IfQQ", flag, label, key, 0) + struct.pack(f"<{len(labels)}f", *labels)


def frame(part: bytes, cflag: int = 0) -> bytes:
    """One record part exactly as dmlc writes it: magic, lrec, data, zero padding to 4 bytes."""
    return struct.pack("<II", MAGIC, (cflag << 29) | len(part)) + part + b"\0" * (-len(part) % 4)


def jpeg_with_magic(seed: int) -> bytes:
    """A valid JPEG whose comment segment holds the RecordIO magic word at payload offset 32 (aligned),
    so that dmlc's writer must split its record."""
    body = jpeg(seed)
    comment = b"xx" + MAGIC_BYTES + b"comment"
    # payload offset of the comment data: 24 (IRHeader) + 2 (SOI) + 2 (COM marker) + 2 (length) = 30
    return body[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + body[2:]


def write_folder(root: Path, records: dict[int, bytes], property_text: str | None, idx_order: list[int] | None = None):
    """Write train.rec with the given framed records (in key order) and train.idx (in ``idx_order``)."""
    root.mkdir(parents=True, exist_ok=True)
    offsets = {}
    blob = bytearray()
    for key in sorted(records):
        offsets[key] = len(blob)
        blob += records[key]
    (root / "train.rec").write_bytes(bytes(blob))
    order = idx_order if idx_order is not None else sorted(records)
    (root / "train.idx").write_text("".join(f"{k}\t{offsets[k]}\n" for k in order))
    if property_text is not None:
        (root / "property").write_text(property_text)
    return offsets


@pytest.fixture
def handmade(tmp_path: Path) -> dict:
    """Header record 0 = [6, 9]; images 1..5 with labels 0,0,1,1,2; identity records 6..8.
    Key 3 carries flag 2 labels [1, 7]; key 4 is split into two parts around a magic word."""
    images = {1: jpeg(1), 2: jpeg(2, gray=True), 3: jpeg(3), 4: jpeg_with_magic(4), 5: jpeg(5)}
    labels = {1: 0, 2: 0, 3: 1, 4: 1, 5: 2}
    records = {0: frame(ir_header(2, 0.0, 0, (6.0, 9.0)))}
    for key, data in images.items():
        if key == 3:
            payload = ir_header(2, 0.0, key, (1.0, 7.0)) + data
            records[key] = frame(payload)
        elif key == 4:
            payload = ir_header(0, 1.0, key) + data
            at = payload.index(MAGIC_BYTES)
            assert at == 32
            records[key] = frame(payload[:at], 1) + frame(payload[at + 4 :], 3)
        else:
            records[key] = frame(ir_header(0, float(labels[key]), key) + data)
    for j, (start, end) in enumerate([(1, 3), (3, 5), (5, 6)]):
        records[6 + j] = frame(ir_header(2, 0.0, 6 + j, (float(start), float(end))))
    root = tmp_path / "hand"
    offsets = write_folder(root, records, "3,16,20\n", idx_order=[0, 5, 3, 1, 2, 4, 8, 6, 7])
    return {"root": root, "images": images, "labels": labels, "offsets": offsets}


def test_handmade_folder_reads_exact_pixels_and_labels(handmade: dict) -> None:
    ds = RecordIODataset(handmade["root"])
    assert len(ds) == 5
    assert ds.keys.dtype == np.int64 and ds.keys.tolist() == [1, 2, 3, 4, 5]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 1, 2]
    assert ds.num_classes == 3
    assert ds.image_size == (16, 20)
    assert ds.rec_path == handmade["root"] / "train.rec"
    for i, key in enumerate(ds.keys.tolist()):
        img, label = ds[i]
        assert isinstance(label, int) and label == handmade["labels"][key]
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 20)
        assert torch.equal(img, decoded(handmade["images"][key]))
        raw, raw_label = ds.read_raw(i)
        assert bytes(raw) == handmade["images"][key]  # the split record comes back with its magic word
        assert raw_label == label
    assert ds[-1][1] == 2
    with pytest.raises(IndexError):
        ds[5]


def test_transform_and_pickling(handmade: dict) -> None:
    ds = RecordIODataset(handmade["root"], transform=lambda x: x.float() / 255)
    img, _ = ds[0]
    assert img.dtype == torch.float32
    plain = RecordIODataset(handmade["root"])
    plain[0]  # maps the file: the map must not travel in the pickle
    ds2 = pickle.loads(pickle.dumps(plain))
    assert torch.equal(ds2[3][0], plain[3][0])
    loader = torch.utils.data.DataLoader(RecordIODataset(handmade["root"]), batch_size=5, num_workers=1)
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 16, 20) and labels.tolist() == [0, 0, 1, 1, 2]


def test_headerless_pack_scans_headers(tmp_path: Path) -> None:
    """No header record, no property: every key is an image; labels from headers (flag > 0 too)."""
    images = [jpeg(10 + k) for k in range(4)]
    records = {
        0: frame(ir_header(0, 2.0, 0) + images[0]),
        1: frame(ir_header(0, 0.0, 1) + images[1]),
        2: frame(ir_header(2, 0.0, 2, (1.0, 5.0)) + images[2]),
        3: frame(ir_header(0, 0.0, 3) + images[3]),
    }
    write_folder(tmp_path / "d", records, None)
    ds = RecordIODataset(tmp_path / "d")
    assert ds.keys.tolist() == [0, 1, 2, 3]
    assert ds.labels.tolist() == [2, 0, 1, 0]
    assert ds.num_classes == 3  # from the data
    assert ds.image_size == (16, 20)  # from the first image
    assert torch.equal(ds[2][0], decoded(images[2]))


@pytest.mark.parametrize("label", [float("inf"), float("-inf"), float("nan"), 1.5])
def test_headerless_pack_refuses_a_label_that_is_not_an_integer(tmp_path: Path, label: float) -> None:
    """One clear line naming the file and the key (an infinite label used to become a garbage int64)."""
    records = {0: frame(ir_header(0, 0.0, 0) + jpeg(1)), 1: frame(ir_header(0, label, 1) + jpeg(2))}
    write_folder(tmp_path / "d", records, None)
    with pytest.raises(DataError, match=r"train\.rec: image key 1 has a non-integer label"):
        _ = RecordIODataset(tmp_path / "d").labels


def test_labels_come_from_headers_not_decoding(handmade: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a, **k):
        raise AssertionError("decoded at open")

    monkeypatch.setattr(recordio, "decode_image_bytes", fail)
    ds = RecordIODataset(handmade["root"])  # property gives the size: no decode needed
    assert ds.labels.tolist() == [0, 0, 1, 1, 2]


# ---------------------------------------------------------------------------------------------- writer


def parse_rec(rec: bytes) -> list[tuple[int, bytes]]:
    """Minimal independent reader: (offset, joined payload) of every record, in file order."""
    out, pos = [], 0
    while pos < len(rec):
        start, parts = pos, []
        while True:
            magic, lrec = struct.unpack_from("<II", rec, pos)
            assert magic == MAGIC
            cflag, n = lrec >> 29, lrec & ((1 << 29) - 1)
            parts.append(rec[pos + 8 : pos + 8 + n])
            pos += 8 + n + (-n % 4)
            if cflag in (0, 3):
                break
        out.append((start, MAGIC_BYTES.join(parts)))
    return out


def test_writer_output_parsed_independently(tmp_path: Path) -> None:
    tensors = [torch.randint(0, 256, (3, 12, 10), dtype=torch.uint8) for _ in range(3)]
    special = jpeg_with_magic(7)
    out = tmp_path / "w"
    with RecordIOWriter(out, image_size=(12, 10)) as w:
        w.add(tensors[0], 0)
        w.add(tensors[1], 0)
        w.add(special, 2)  # label 1 gets no image: an empty identity range
        w.add(tensors[2], 2)
    rec = (out / "train.rec").read_bytes()
    records = parse_rec(rec)
    idx = [tuple(map(int, line.split("\t"))) for line in (out / "train.idx").read_text().splitlines()]
    offsets = {start: payload for start, payload in records}
    assert sorted(o for _, o in idx) == sorted(offsets)
    by_key = {k: offsets[o] for k, o in idx}
    flag, label, id_, _ = struct.unpack_from("<IfQQ", by_key[0])
    assert (flag, id_) == (2, 0) and idx[0] == (0, 0)  # header first in the file
    assert struct.unpack_from("<2f", by_key[0], 24) == (5.0, 8.0)  # a = 5 (images 1..4), b = a + 3 classes
    for key, want in zip(range(1, 5), [0, 0, 2, 2]):
        flag, label, id_, _ = struct.unpack_from("<IfQQ", by_key[key])
        assert flag == 0 and label == float(want) and id_ == key
    assert by_key[3][24:] == special  # JPEG bytes stored as they are
    assert struct.pack("<II", MAGIC, (1 << 29) | 32) in rec  # ... and that record was split around the magic
    ranges = [struct.unpack_from("<2f", by_key[k], 24) for k in (5, 6, 7)]
    assert ranges == [(1.0, 3.0), (0.0, 0.0), (3.0, 5.0)]
    assert (out / "property").read_text() == "3,12,10\n"


def test_writer_reader_round_trip(tmp_path: Path) -> None:
    tensors = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8) for _ in range(4)]
    gray = torch.randint(0, 256, (16, 16), dtype=torch.uint8)
    out = tmp_path / "rt"
    with RecordIOWriter(out, num_classes=4, image_size=(16, 16), quality=90) as w:
        for i, t in enumerate(tensors):
            assert w.add(t, i // 2) == i + 1
        w.add(gray, 3)
        w.add(tensors[0].permute(1, 2, 0).numpy(), 3)  # HWC numpy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the empty identity range of class 2 is valid: no fallback
        ds = RecordIODataset(out)
    assert ds.labels.tolist() == [0, 0, 1, 1, 3, 3]
    assert ds.num_classes == 4 and ds.image_size == (16, 16)
    for i, t in enumerate(tensors):
        raw, label = ds.read_raw(i)
        assert bytes(raw) == bytes(encode_jpeg(t, quality=90).numpy())
        img, _ = ds[i]
        assert torch.equal(img, decoded(bytes(raw)))
    assert ds[4][0].shape == (3, 16, 16)


def test_writer_rejects_ungrouped_labels_and_bad_labels(tmp_path: Path) -> None:
    img = jpeg(0)
    with pytest.raises(DataError, match="grouped by label"):
        with RecordIOWriter(tmp_path / "a", image_size=None) as w:
            w.add(img, 0)
            w.add(img, 1)
            w.add(img, 0)
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too
    with pytest.raises(DataError, match="outside"):
        with RecordIOWriter(tmp_path / "b", num_classes=2) as w:
            w.add(img, 2)
    with pytest.raises(DataError, match="expected"):
        with RecordIOWriter(tmp_path / "c", image_size=(8, 8)) as w:
            w.add(torch.zeros(3, 9, 8, dtype=torch.uint8), 0)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        RecordIOWriter(tmp_path / "d")


def test_frame_record_matches_dmlc_splitting() -> None:
    payload = b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ij" + b"x" + MAGIC_BYTES  # last one unaligned
    framed = recordio.frame_record(payload)
    want = frame(b"abcd", 1) + frame(b"efgh", 2) + frame(b"ijx" + MAGIC_BYTES, 3)
    assert framed == want
    assert parse_rec(framed) == [(0, payload)]


# ------------------------------------------------------------------------------------------ idx cache


def naive_parse(text: str) -> tuple[list[int], list[int]]:
    keys, offsets = [], []
    for line in text.splitlines():
        if line.strip():
            k, o = line.split()
            keys.append(int(k))
            offsets.append(int(o))
    return keys, offsets


@pytest.mark.parametrize(
    "text",
    ["0\t0\n1\t40\n", "5\t8\r\n3\t4\r\n", "1\t2\n\n7\t12", "", "123456789012\t98765432109876\n"],
)
def test_fast_idx_parse_equals_naive(text: str) -> None:
    keys, offsets = parse_idx(text.encode())
    assert (keys.tolist(), offsets.tolist()) == naive_parse(text)
    assert keys.dtype == np.int64 and offsets.dtype == np.int64


def test_fast_idx_parse_random_equals_naive() -> None:
    rng = np.random.default_rng(0)
    keys = rng.permutation(5000)
    offsets = np.cumsum(rng.integers(4, 10**6, 5000)) * 4
    text = "".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets))
    k2, o2 = parse_idx(text.encode())
    assert np.array_equal(k2, keys) and np.array_equal(o2, offsets)


def test_bad_idx_line_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train.idx: line 2 is not"):
        parse_idx(b"0\t0\n1\tforty\n", tmp_path / "train.idx")


def test_index_cache_created_reused_invalidated(
    handmade: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = handmade["root"]
    monkeypatch.setenv("TIMMFACE_CACHE", str(tmp_path / "cache"))
    RecordIODataset(root)
    assert [p.parent for p in (tmp_path / "cache").rglob("*.npz")] == [tmp_path / "cache" / "idx"]
    calls = []
    real = recordio.parse_idx
    monkeypatch.setattr(recordio, "parse_idx", lambda *a: calls.append(1) or real(*a))
    ds = RecordIODataset(root)
    assert calls == [] and ds.labels.tolist() == [0, 0, 1, 1, 2]  # reused
    # rewrite train.idx in another order: same size; the fingerprint must still change
    idx = root / "train.idx"
    lines = idx.read_text().splitlines(keepends=True)
    idx.write_text("".join(sorted(lines)))
    st = idx.stat()
    os.utime(idx, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    ds = RecordIODataset(root)
    assert calls == [1] and ds.keys.tolist() == [1, 2, 3, 4, 5]


def test_an_unwritable_index_cache_costs_only_time(
    handmade: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIMMFACE_CACHE", str(tmp_path / "cache"))
    recordio.index_cache_path(handmade["root"] / "train.idx").mkdir(parents=True)  # the cache file cannot be written
    calls = []
    real = recordio.parse_idx
    monkeypatch.setattr(recordio, "parse_idx", lambda *a: calls.append(1) or real(*a))
    for _ in range(2):
        assert RecordIODataset(handmade["root"]).labels.tolist() == [0, 0, 1, 1, 2]
    assert calls == [1, 1]  # parsed each time, never an error


# ------------------------------------------------------------------------------------------ bad input


def test_missing_paths(tmp_path: Path, handmade: dict) -> None:
    with pytest.raises(DataError, match="nope: no such data folder"):
        RecordIODataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/train.rec: missing"):
        RecordIODataset(tmp_path / "empty")
    (handmade["root"] / "train.idx").unlink()
    with pytest.raises(DataError, match=r"hand/train.idx: missing"):
        RecordIODataset(handmade["root"])


def test_idx_pointing_past_end(handmade: dict) -> None:
    idx = handmade["root"] / "train.idx"
    idx.write_text(idx.read_text() + "9\t999999\n")
    expected = r"train.rec: is \d+ bytes but train.idx expects at least 1000007 bytes \(record key 9 at byte 999999\)"
    with pytest.raises(DataError, match=expected):
        RecordIODataset(handmade["root"])


def test_idx_and_rec_disagree_lazily(handmade: dict) -> None:
    """An offset 4 bytes into record 2: open succeeds (only cheap checks), the read names key and byte."""
    idx = handmade["root"] / "train.idx"
    bad = handmade["offsets"][2] + 4
    idx.write_text(idx.read_text().replace(f"2\t{handmade['offsets'][2]}\n", f"2\t{bad}\n"))
    with pytest.raises(DataError, match=rf"train.rec: no RecordIO magic number at byte {bad}.*\(key 2\)"):
        ds = RecordIODataset(handmade["root"])
        ds.read_raw(1)


def test_record_without_magic(handmade: dict) -> None:
    rec = handmade["root"] / "train.rec"
    data = bytearray(rec.read_bytes())
    data[0:4] = b"\0\0\0\0"  # record 0 at byte 0
    rec.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train.rec: no RecordIO magic number at byte 0.*\(key 0\)"):
        RecordIODataset(handmade["root"])


def test_truncated_rec(handmade: dict) -> None:
    rec = handmade["root"] / "train.rec"
    data = rec.read_bytes()
    last = max(handmade["offsets"].values())
    rec.write_bytes(data[: last + 20])  # the last record's header is there, its body is not
    with pytest.raises(DataError, match=rf"train.rec: is {last + 20} bytes but train.idx expects at least \d+ bytes "
                       r"\(record key 8 at byte \d+\): truncated download or copy\?"):  # fmt: skip
        RecordIODataset(handmade["root"])


def test_label_outside_num_classes(handmade: dict) -> None:
    (handmade["root"] / "property").write_text("2,16,20\n")
    with pytest.raises(DataError, match=r"image key 5 has label 2, outside \[0, 2\)"):
        RecordIODataset(handmade["root"])


def test_negative_label(tmp_path: Path) -> None:
    records = {0: frame(ir_header(0, 0.0, 0) + jpeg(0)), 1: frame(ir_header(0, -1.0, 1) + jpeg(1))}
    write_folder(tmp_path / "neg", records, None)
    with pytest.raises(DataError, match=r"neg/train.rec: image key 1 has label -1"):
        RecordIODataset(tmp_path / "neg")


def test_corrupt_jpeg_raises_corrupt_record_error(tmp_path: Path) -> None:
    records = {0: frame(ir_header(0, 0.0, 0) + jpeg(0)), 1: frame(ir_header(0, 0.0, 1) + b"\xff\xd8garbage!")}
    write_folder(tmp_path / "c", records, "1,16,20\n")
    ds = RecordIODataset(tmp_path / "c")
    assert ds[0][1] == 0
    with pytest.raises(CorruptRecordError, match=r"c/train.rec: key 1: cannot decode image") as info:
        ds[1]
    assert info.value.key == 1
    assert "\n" not in str(info.value)
