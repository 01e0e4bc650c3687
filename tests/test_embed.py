"""``timmface embed``: embedding files, resume after interruption, and the teacher-embedding cache."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import timmface.embedding.engine as ec
from tests.conftest import class_image, write_toy_dataset
from tests.test_eval_cli import backbone_of, fake_run
from timmface.cli import main
from timmface.data.batch import normalize_on_device
from timmface.data.image import resize_uint8
from timmface.data.recordio import RecordIODataset
from timmface.embedding.cache import EmbeddingCache, dataset_fingerprint
from timmface.embedding.files import read_embeddings
from timmface.errors import DataError


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("embed") / "toy", num_classes=6, per_class=4)  # 24 records


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_run(tmp_path_factory.mktemp("teacher") / "run")


def direct(model: torch.nn.Module, image: torch.Tensor, flip: bool = False, size: int = 112) -> torch.Tensor:
    """What the student sees, embedded one image at a time: resize, [-1, 1], optional mirror."""
    if image.shape[-2:] != (size, size):
        image = resize_uint8(image, size)
    x = normalize_on_device(image[None], None)
    with torch.no_grad():
        return model(torch.flip(x, dims=[3]) if flip else x)[0].float()


def embed(*args: str) -> int:
    return main(["embed", "--workers", "0", "--batch-size", "8", "--no-progress", *args])


# --------------------------------------------------------------------------------------------------
# Embedding files
# --------------------------------------------------------------------------------------------------


def test_safetensors_of_a_recordio_folder_hold_keys_labels_and_embeddings(toy: Path, teacher: Path, tmp_path: Path):
    out = tmp_path / "emb.safetensors"
    assert embed("--model", str(teacher), "--data", str(toy), "--out", str(out), "--workers", "2") == 0
    keys, emb, labels = read_embeddings(out)
    ds = RecordIODataset(toy)
    assert np.array_equal(keys, ds.keys) and keys.dtype == np.int64
    assert np.array_equal(labels, ds.labels)
    model = backbone_of(teacher)  # a run's EMA backbone
    expected = torch.stack([direct(model, ds[i][0]) for i in range(len(ds))])
    torch.testing.assert_close(torch.from_numpy(emb), expected, rtol=1e-5, atol=1e-5)
    assert not out.with_name(out.name + ".partial").exists()
    # an existing output is not silently replaced
    assert embed("--model", str(teacher), "--data", str(toy), "--out", str(out)) == 2


def _write_pngs(root: Path) -> dict[str, torch.Tensor]:
    """PNGs (lossless, so decoding gives the tensor back) ``root/id<c>/<s>.png``; relative path -> image."""
    from torchvision.io import encode_png

    images = {}
    for c in range(3):
        for s in range(2):
            image = class_image(c, s, 112 if s == 0 else 40)  # one size needs no resize, the other does
            rel = f"id{c}/{s}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(encode_png(image).numpy().tobytes())
            images[rel] = image
    return images


@pytest.mark.filterwarnings("ignore:.*skipped 1 files that are not images")  # list.txt beside the identity folders
def test_npy_of_image_lists_and_folders(teacher: Path, tmp_path: Path):
    faces = tmp_path / "faces"
    images = _write_pngs(faces)
    rels = list(images)
    (faces / "list.txt").write_text("# my faces\n" + "".join(f"{r}\n" for r in rels))  # relative to the list
    flat = tmp_path / "flat"
    flat.mkdir()
    for r in rels[:2]:
        shutil.copy(faces / r, flat / r.replace("/", "_"))
    # --data -> (expected keys, the image of each key)
    cases = {
        "list": ([str(faces / "list.txt")], rels, rels),
        "paths": ([str(faces / r) for r in rels[:3]], [str(faces / r) for r in rels[:3]], rels[:3]),
        "identity_folder": ([str(faces)], rels, rels),
        "flat_folder": ([str(flat)], ["id0_0.png", "id0_1.png"], rels[:2]),
    }
    model = backbone_of(teacher)
    for name, (data, keys_expected, sources) in cases.items():
        out = tmp_path / f"{name}.npy"
        assert embed("--model", str(teacher), "--data", *data, "--out", str(out)) == 0, name
        keys, emb, labels = read_embeddings(out)
        assert list(keys) == keys_expected, name
        assert (labels is not None) == (name == "identity_folder"), name  # identity folders have labels
        want = torch.stack([direct(model, images[r]) for r in sources])
        torch.testing.assert_close(torch.from_numpy(emb), want, rtol=1e-5, atol=1e-5, msg=name)
    assert (tmp_path / "flat_folder.keys.txt").read_text().splitlines() == ["id0_0.png", "id0_1.png"]


def test_flip_and_normalize_options(toy: Path, teacher: Path, tmp_path: Path):
    out = tmp_path / "f.safetensors"
    assert embed("--model", str(teacher), "--data", str(toy), "--out", str(out), "--flip", "--normalize") == 0
    _, emb, _ = read_embeddings(out)
    ds, model = RecordIODataset(toy), backbone_of(teacher)
    want = torch.stack([direct(model, ds[i][0]) + direct(model, ds[i][0], flip=True) for i in range(3)])
    torch.testing.assert_close(torch.from_numpy(emb[:3]), torch.nn.functional.normalize(want), rtol=1e-5, atol=1e-5)


REAL_EMBED_BATCH = ec.embed_batch


class Counting:
    """Wraps ``engine.embed_batch``: counts calls and images, raises after ``fail_after`` calls."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls, self.images, self.fail_after = 0, 0, fail_after

    def __call__(self, model, images, *args, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.images += len(images)
        return REAL_EMBED_BATCH(model, images, *args, **kwargs)


@pytest.mark.parametrize("cache", [False, True], ids=["safetensors", "tfemb-cache"])
def test_resume_after_interruption_is_identical_and_skips_done_rows(
    toy: Path, teacher: Path, tmp_path: Path, monkeypatch, cache: bool
):
    suffix = ".tfemb" if cache else ".safetensors"
    reference, resumed = tmp_path / f"ref{suffix}", tmp_path / f"res{suffix}"
    args = ["--model", str(teacher), "--data", str(toy)]
    assert embed(*args, "--out", str(reference)) == 0  # 24 records, batches of 8

    crash = Counting(fail_after=2)
    monkeypatch.setattr(ec, "embed_batch", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed(*args, "--out", str(resumed))
    store = resumed if cache else resumed.with_name(resumed.name + ".partial")
    with EmbeddingCache.open(store) as partial:
        assert int(partial.done.sum()) == 16 and not partial.complete  # two batches made it to disk

    again = Counting()
    monkeypatch.setattr(ec, "embed_batch", again)
    assert embed(*args, "--out", str(resumed)) == 0
    assert (again.calls, again.images) == (1, 8)  # only the missing batch was computed
    if cache:
        with EmbeddingCache.open(reference) as a, EmbeddingCache.open(resumed) as b:
            assert b.complete and np.array_equal(a.rows(), b.rows())
    else:
        (ka, ea, _), (kb, eb, _) = read_embeddings(reference), read_embeddings(resumed)
        assert np.array_equal(ka, kb) and np.array_equal(ea, eb)
        assert not store.exists()


# --------------------------------------------------------------------------------------------------
# The teacher-embedding cache
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(toy: Path, teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "teacher.tfemb"
    assert embed("--model", str(teacher), "--data", str(toy), "--out", str(out)) == 0
    return out


def test_cache_file_layout(cache: Path, toy: Path, teacher: Path):
    from teachers import teacher_fingerprint

    raw = cache.read_bytes()
    assert raw[:8] == b"TFEMBED1"
    (h,) = struct.unpack("<Q", raw[8:16])
    meta = json.loads(raw[16 : 16 + h].decode("utf-8"))  # padded with spaces, which JSON ignores
    assert (16 + h) % 4096 == 0 and meta["data_offset"] == 16 + h
    n, d = 24, 32
    assert meta["format"] == "timmface-embeddings" and meta["version"] == 1 and meta["dtype"] == "float16"
    assert (meta["num_records"], meta["dim"], meta["views"]) == (n, d, ["original", "hflip"])
    assert meta["done_offset"] == meta["data_offset"] + n * 2 * d * 2 and len(raw) == meta["done_offset"] + n
    assert raw[meta["done_offset"] :] == b"\x01" * n
    assert meta["image_size"] == 112 and meta["created"]
    ds = RecordIODataset(toy)
    assert meta["dataset"] == {
        "path": str(toy),
        "fingerprint": dataset_fingerprint(ds),
        "num_records": n,
        "num_classes": 6,
    }
    assert meta["teacher"]["path"] == str(teacher) and meta["teacher"]["fingerprint"] == teacher_fingerprint(teacher)
    assert meta["teacher"]["info"]["architecture"] == "test_vit"
    rows = np.frombuffer(raw, dtype="<f2", count=n * 2 * d, offset=meta["data_offset"]).reshape(n, 2, d)
    with EmbeddingCache.open(cache) as c:
        assert np.array_equal(c.rows(), rows)
        assert (c.num_records, c.dim, c.complete) == (n, d, True)
        assert c.dataset_fingerprint == dataset_fingerprint(ds) and c.teacher_fingerprint == teacher_fingerprint(
            teacher
        )


def test_cache_lookup_returns_the_teachers_view_of_each_image(cache: Path, toy: Path, teacher: Path):
    from teachers import load_teacher

    model = load_teacher(teacher)  # distillation runs exactly this module when it has no cache
    ds = RecordIODataset(toy)
    idx = torch.tensor([0, 5, 5, 23, 11])
    flips = torch.tensor([False, False, True, True, False])
    with EmbeddingCache.open(cache) as c:
        got = c.lookup(idx, flips)
        assert got.dtype == torch.float32 and got.shape == (5, 32)
        rows = c.rows()
    assert not np.array_equal(rows[:, 0], rows[:, 1])  # the mirrored view is a different embedding
    for j, (i, f) in enumerate(zip(idx.tolist(), flips.tolist())):
        assert torch.equal(got[j], torch.from_numpy(rows[i, int(f)].astype(np.float32)))
        want = direct(model, ds[i][0], flip=f)
        torch.testing.assert_close(got[j], want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


def test_cache_check_refuses_another_dataset_or_teacher(cache: Path):
    with EmbeddingCache.open(cache) as c:
        c.check(dataset_fingerprint=c.dataset_fingerprint, teacher_fingerprint=c.teacher_fingerprint)  # fine
        with pytest.raises(DataError) as e:
            c.check(dataset_fingerprint="0" * 16, teacher_fingerprint=c.teacher_fingerprint)
        msg = str(e.value)
        assert "dataset differs" in msg and "teacher differs" not in msg and msg.startswith(f"{cache}: ")
        assert "rebuild it with timmface embed" in msg and "\n" not in msg
        with pytest.raises(DataError, match=r"distill\.cache does not match: teacher differs"):
            c.check(teacher_fingerprint="f" * 16)


def test_cli_refuses_a_cache_built_for_another_teacher_unless_overwrite(cache: Path, toy: Path, tmp_path: Path, capsys):
    from teachers import teacher_fingerprint

    other = fake_run(tmp_path / "other", seed=1)
    copy = tmp_path / "c.tfemb"
    shutil.copy(cache, copy)
    assert embed("--model", str(other), "--data", str(toy), "--out", str(copy)) == 2
    err = capsys.readouterr().err.strip()
    assert "teacher fingerprint" in err and "--overwrite" in err and "\n" not in err
    assert embed("--model", str(other), "--data", str(toy), "--out", str(copy), "--overwrite") == 0
    with EmbeddingCache.open(copy) as c:
        assert c.teacher_fingerprint == teacher_fingerprint(other) and c.complete


def test_dataset_fingerprint_follows_contents_not_location(toy: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(toy, copy)
    assert dataset_fingerprint(RecordIODataset(copy)) == dataset_fingerprint(RecordIODataset(toy))
    other = write_toy_dataset(tmp_path / "other", num_classes=6, per_class=5)
    assert dataset_fingerprint(RecordIODataset(other)) != dataset_fingerprint(RecordIODataset(toy))


def _corrupt_record(root: Path, index: int) -> int:
    """Break the JPEG of dataset item ``index`` in place (its record framing stays valid); returns its key."""
    ds = RecordIODataset(root, index_cache=False)
    key = int(ds.keys[index])
    offsets = dict(line.split("\t") for line in (root / "train.idx").read_text().split("\n") if line)
    start = int(offsets[str(key)])
    data = bytearray((root / "train.rec").read_bytes())
    soi = data.index(b"\xff\xd8\xff", start)
    data[soi : soi + 3] = b"BAD"
    (root / "train.rec").write_bytes(bytes(data))
    return key


def test_corrupt_records_stay_missing_and_are_named(toy: Path, teacher: Path, tmp_path: Path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(toy, broken)
    key = _corrupt_record(broken, 5)
    out = tmp_path / "c.tfemb"
    assert embed("--model", str(teacher), "--data", str(broken), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert f"1 of 24 records could not be decoded and have no embedding: keys {key}" in printed
    with EmbeddingCache.open(out) as c:
        assert c.missing().tolist() == [5] and not c.complete
        assert c.lookup([4, 6], [True, False]).shape == (2, 32)
        with pytest.raises(DataError, match=r"record 5 has no cached embedding \(1 of 24 records missing"):
            c.lookup([4, 5, 6], [False, False, False])

    # a plain embedding file leaves the record out and names it
    out = tmp_path / "e.safetensors"
    assert embed("--model", str(teacher), "--data", str(broken), "--out", str(out)) == 0
    keys, emb, _ = read_embeddings(out)
    assert len(keys) == 23 and key not in keys.tolist() and emb.shape == (23, 32)
    assert f"keys {key}" in capsys.readouterr().out


def test_open_rejects_files_that_are_not_caches(cache: Path, tmp_path: Path):
    junk = tmp_path / "junk.tfemb"
    junk.write_bytes(b"not a cache at all" * 10)
    with pytest.raises(DataError, match="junk.tfemb: not a timmface embedding file"):
        EmbeddingCache.open(junk)
    truncated = tmp_path / "t.tfemb"
    truncated.write_bytes(cache.read_bytes()[:-10])
    with pytest.raises(DataError, match="t.tfemb: truncated embedding file"):
        EmbeddingCache.open(truncated)
    newer = tmp_path / "v.tfemb"
    newer.write_bytes(cache.read_bytes().replace(b'"version": 1', b'"version": 7', 1))
    with pytest.raises(DataError, match="v.tfemb: embedding file version 7 is not supported"):
        EmbeddingCache.open(newer)
    with pytest.raises(DataError, match="not found"):
        EmbeddingCache.open(tmp_path / "nope.tfemb")


def test_build_cache_api_with_an_onnx_teacher(toy: Path, teacher: Path, tmp_path: Path):
    """The API distillation calls, with a teacher that has no torch parameters (ONNX through onnxruntime)."""
    pytest.importorskip("onnxruntime")
    from teachers import load_teacher, teacher_fingerprint
    from timmface.export import export_onnx

    onnx_path = tmp_path / "t.onnx"
    export_onnx(backbone_of(teacher), onnx_path)
    model = load_teacher(onnx_path)
    ds = RecordIODataset(toy)
    fingerprint = teacher_fingerprint(onnx_path)
    out = ec.build_cache(
        model, ds, tmp_path / "o.tfemb", teacher_path=str(onnx_path), teacher_fingerprint=fingerprint,
        teacher_info=model.teacher_info, dataset_path=str(toy), batch_size=10, num_workers=0, progress=False,
    )  # fmt: skip
    with EmbeddingCache.open(out) as c:
        c.check(dataset_fingerprint(ds), teacher_fingerprint(onnx_path))
        got = c.lookup([3, 3], [False, True])
    torch_model = backbone_of(teacher)
    for j, flip in enumerate([False, True]):
        want = direct(torch_model, ds[3][0], flip=flip)
        torch.testing.assert_close(got[j], want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


def test_cache_of_an_image_folder_and_its_fingerprint(teacher: Path, tmp_path: Path, capsys):
    import pickle

    from timmface.data.folder import ImageFolderDataset

    faces = tmp_path / "faces"
    _write_pngs(faces)
    out = tmp_path / "f.tfemb"
    # progress on: without a terminal it prints plain lines (what a batch job's log shows)
    assert main(["embed", "--model", str(teacher), "--data", str(faces), "--out", str(out), "--workers", "0"]) == 0
    assert "teacher cache: 6/6 (100.0%)" in capsys.readouterr().out
    ds = ImageFolderDataset(faces)
    with EmbeddingCache.open(out) as c:
        assert c.complete and c.meta["dataset"]["num_classes"] == 3
        c.check(dataset_fingerprint=dataset_fingerprint(ds))
        clone = pickle.loads(pickle.dumps(c))  # DataLoader workers get a handle, not the rows
        assert len(pickle.dumps(c)) < 4096 and torch.equal(clone.lookup([2], [True]), c.lookup([2], [True]))
    shutil.copytree(faces, tmp_path / "copy")
    assert dataset_fingerprint(ImageFolderDataset(tmp_path / "copy")) == dataset_fingerprint(ds)
    (tmp_path / "copy" / "id2" / "1.png").write_bytes((faces / "id0" / "0.png").read_bytes())  # other contents
    assert dataset_fingerprint(ImageFolderDataset(tmp_path / "copy")) != dataset_fingerprint(ds)
