"""The fast batch path (whole micro-batches per worker, uint8 to the device) against the per-sample
reference path; the byte-shipping path (``data.decode=gpu``) with a CPU decode device; bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from tests.conftest import class_image, tiny_run_args
from timmface.cli import main
from timmface.data.batch import Batch, SlotPool, normalize_on_device
from timmface.data.folder import ImageFolderDataset
from timmface.data.gpu_decode import EncodedBatchDecoder, resolve_decode_device
from timmface.data.image import decode_image_bytes, decode_rgb
from timmface.data.loader import build_train_loader
from timmface.data.recordio import RecordIODataset, RecordIOWriter
from timmface.data.transforms import build_transform
from timmface.errors import ConfigError, DataError

SIZE = 16
AUG = [
    {"name": "RandomAffine", "args": [15], "kwargs": {"translate": [0.1, 0.1]}},
    {"name": "ColorJitter", "args": [0.3, 0.3]},
]


def jpeg(label: int, sample: int, size: int = SIZE, gray: bool = False) -> bytes:
    img = class_image(label, sample, size)
    return encode_jpeg(img[:1] if gray else img, quality=90).numpy().tobytes()


def write_mixed_recordio(
    root: Path, num_classes: int = 5, per_class: int = 8, corrupt: tuple[int, ...] = (13,)
) -> Path:
    """``num_classes * per_class`` images at SIZE: every 7th is 20x24 (resized when read), every 5th is
    grayscale, and the images numbered in ``corrupt`` are bytes that start like a JPEG but are not one."""
    with RecordIOWriter(root, num_classes=num_classes, image_size=(SIZE, SIZE)) as w:
        for i in range(num_classes * per_class):
            label = i // per_class
            if i in corrupt:
                data = b"\xff\xd8\xff" + bytes(range(200))
            elif i % 7 == 3:
                data = encode_jpeg(class_image(label, i, 24)[:, :20, :], quality=90).numpy().tobytes()
            else:
                data = jpeg(label, i, gray=i % 5 == 4)
            w.add(data, label)
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mixed_recordio(tmp_path_factory.mktemp("pipeline") / "rec")


def batches(dataset, n: int, **kwargs) -> list[Batch]:
    loader = build_train_loader(dataset, 8, image_size=SIZE, grad_accum=2, prefetch_factor=2, **kwargs)
    try:
        return [next(loader) for _ in range(n)]  # held together: lent buffers must not be overwritten
    finally:
        loader.close()


def assert_same(got: list[Batch], ref: list[Batch]) -> None:
    assert len(got) == len(ref)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a.images.shape == b.images.shape, k
        assert torch.equal(a.images, b.images), k
        assert torch.equal(a.labels, b.labels) and torch.equal(a.indices, b.indices), k
        assert torch.equal(a.flips, b.flips), k
        assert a.bad == b.bad, k


# 40 images, global batch 8, two micro-batches per step: 10 micro-batches per epoch; 14 cross an epoch
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("aug", [False, True])
def test_fast_path_gives_the_reference_batches(mixed: Path, workers: int, aug: bool) -> None:
    ds = RecordIODataset(mixed)
    transform = build_transform(AUG) if aug else None
    for seed in (0, 3):
        kw = dict(seed=seed, num_workers=workers, transform=transform)
        fast = batches(ds, 14, **kw)
        assert_same(fast, batches(ds, 14, per_sample=True, **kw))
        assert sum(len(b.bad) for b in fast) == 1 and sum(b.resized for b in fast) > 0
        assert fast[0].images.dtype == torch.uint8 and fast[0].images.shape[1:] == (3, SIZE, SIZE)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("aug", [False, True])
def test_shipped_bytes_decoded_on_a_cpu_device_give_the_reference_batches(mixed: Path, workers: int, aug: bool):
    """data.decode=gpu's byte path, decoding on an injected CPU device: the CPU path's pixels exactly."""
    ds = RecordIODataset(mixed)
    transform = build_transform(AUG) if aug else None
    kw = dict(seed=1, num_workers=workers, transform=transform)
    shipped = batches(ds, 12, decode_device=torch.device("cpu"), **kw)
    assert_same(shipped, batches(ds, 12, per_sample=True, **kw))
    assert sum(b.resized for b in shipped) > 0


def test_decoder_skips_a_corrupt_record_with_the_datasets_message(mixed: Path) -> None:
    ds = RecordIODataset(mixed)
    loader = build_train_loader(ds, 40, image_size=SIZE, num_workers=0, decode_device=torch.device("cpu"))
    batch = next(loader)
    assert len(batch.labels) == 39 and len(batch.bad) == 1
    index, key, message = batch.bad[0]
    assert key == int(ds.keys[index]) and "cannot decode image" in message and str(ds.rec_path) in message


def test_resume_is_exact_on_the_fast_path(mixed: Path) -> None:
    ds = RecordIODataset(mixed)
    a = build_train_loader(ds, 8, image_size=SIZE, num_workers=2, seed=4, grad_accum=2, prefetch_factor=2)
    for _ in range(7):  # inside the second step's micro-batches: the position is the step boundary
        next(a)
    next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(6)]
    a.close()
    b = build_train_loader(ds, 8, image_size=SIZE, num_workers=2, seed=4, grad_accum=2, prefetch_factor=2)
    b.load_state_dict(state)
    got = [next(b) for _ in range(6)]
    b.close()
    assert_same(got, expected)


def test_lent_buffers_are_reused_and_never_overwritten_while_held() -> None:
    pool = SlotPool(2, 4, SIZE)
    a, b = pool.acquire(), pool.acquire()
    assert {a, b} == {0, 1} and pool.acquire() is None  # both on their way to the main process
    held = pool.view(a, 3)
    pool.handed_out(a)
    pool.handed_out(b)
    assert pool.acquire() == b  # b's batch was dropped; a's is still held
    assert pool.acquire() is None
    del held
    assert pool.acquire() == a


def test_the_loader_lends_its_buffers(mixed: Path) -> None:
    loader = build_train_loader(RecordIODataset(mixed), 8, image_size=SIZE, num_workers=1, prefetch_factor=2)
    ptrs = [next(loader).images.untyped_storage().data_ptr() for _ in range(12)]
    pool = {b.untyped_storage().data_ptr() for b in loader.pool.buffers}
    loader.close()
    assert sum(p in pool for p in ptrs) >= 10  # the one corrupt record may push a batch to a fresh buffer


def test_device_normalisation_of_a_fast_batch_equals_the_cpu_reference(mixed: Path) -> None:
    ds = RecordIODataset(mixed)
    batch = batches(ds, 1, seed=2, num_workers=0)[0]
    assert batch.images.is_contiguous(memory_format=torch.channels_last)  # HWC buffers, seen as NCHW
    for fmt in (torch.contiguous_format, torch.channels_last):
        out = normalize_on_device(batch.images, batch.flips, memory_format=fmt)
        assert out.is_contiguous(memory_format=fmt)
        ref = []
        for img, f in zip(batch.images, batch.flips):
            x = img.float() / 255.0
            x = torch.flip(x, dims=[2]) if f else x
            ref.append((x - 0.5) / 0.5)
        torch.testing.assert_close(out, torch.stack(ref), rtol=0, atol=1e-6)


def test_decode_rgb_matches_decode_image_bytes() -> None:
    img = class_image(1, 2, 24)
    for data in (jpeg(1, 2, 24), jpeg(1, 2, 24, gray=True), encode_png(img).numpy().tobytes()):
        assert torch.equal(decode_rgb(data), decode_image_bytes(data))
        assert torch.equal(decode_rgb(torch.frombuffer(bytearray(data), dtype=torch.uint8)), decode_image_bytes(data))
    with pytest.raises(RuntimeError):
        decode_rgb(b"\xff\xd8\xffnot a jpeg")


def test_decode_device_selection() -> None:
    cpu = torch.device("cpu")
    assert resolve_decode_device("cpu", cpu) is None
    assert resolve_decode_device("cpu", torch.device("cuda", 0)) is None
    assert resolve_decode_device("gpu", torch.device("cuda", 1)) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="data.decode=gpu needs a CUDA device"):
        resolve_decode_device("gpu", cpu)
    with pytest.raises(ConfigError, match="not one of cpu, gpu"):
        resolve_decode_device("nvjpeg", cpu)


def test_decode_gpu_on_a_cpu_run_is_one_line(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", *tiny_run_args(toy_data, tmp_path / "r", "data.decode=gpu", "device=cpu")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.decode=gpu needs a CUDA device" in err[0]


# ------------------------------------------------------------------------------------------ bad input


def test_idx_and_rec_that_disagree_stop_the_run_in_one_line(tmp_path: Path) -> None:
    """A record's offset moved by 4 bytes: opening passes (cheap checks); the worker's read fails and the
    main process raises the dataset's one-line error, not a worker traceback."""
    root = write_mixed_recordio(tmp_path / "rec", corrupt=())
    lines = (root / "train.idx").read_text().splitlines()
    key, offset = lines[7].split("\t")  # key 7: not among the records the dataset probes when it opens
    lines[7] = f"{key}\t{int(offset) + 4}"
    (root / "train.idx").write_text("\n".join(lines) + "\n")
    ds = RecordIODataset(root)
    loader = build_train_loader(ds, 40, image_size=SIZE, num_workers=2)
    with pytest.raises(DataError) as info:
        next(loader)
    loader.close()
    message = str(info.value)
    assert "\n" not in message and "no RecordIO magic number" in message and f"(key {key})" in message


def test_truncated_rec_is_one_line_at_start(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_mixed_recordio(tmp_path / "rec", corrupt=())
    data = (root / "train.rec").read_bytes()
    (root / "train.rec").write_bytes(data[: len(data) * 2 // 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", *tiny_run_args(root, tmp_path / "r", "data.image_size=16")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is {len(data) * 2 // 3} bytes" in err[0] and "truncated download or copy?" in err[0]


def test_resized_images_are_reported_once_per_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "rec"
    with RecordIOWriter(root, num_classes=4, image_size=(32, 32)) as w:
        for c in range(4):
            for s in range(6):  # every image 40x40: all are resized
                w.add(encode_jpeg(class_image(c, s, 40), quality=95).numpy().tobytes(), c)
    args = tiny_run_args(root, tmp_path / "r", "total_steps=4", "eval_every=0", "save_every=0")
    assert main(["train", *args]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "are resized to" in x]
    assert len(lines) == 1 and "40x40" in lines[0] and "32x32" in lines[0]


def write_messy_folder(root: Path) -> Path:
    """Three identities (JPEG and PNG), an empty identity folder, a text file, and a .jpg that is not one."""
    for c, name in enumerate(["alice", "bob", "carol"]):
        (root / name).mkdir(parents=True)
        for s in range(6):
            img = class_image(c, s, SIZE)
            data = encode_png(img) if s % 2 else encode_jpeg(img, quality=90)
            (root / name / f"{s}.{'png' if s % 2 else 'jpg'}").write_bytes(data.numpy().tobytes())
    (root / "dave").mkdir()  # empty identity folder
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "carol" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 64)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_with_bad_files_through_the_loader(tmp_path: Path, workers: int) -> None:
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(write_messy_folder(tmp_path / "faces"))
    messages = " ".join(str(r.message) for r in record)
    assert "skipped 1 files that are not images" in messages and "1 identity folders have no images" in messages
    assert ds.num_classes == 3 and len(ds) == 19
    kw = dict(seed=0, num_workers=workers)
    loader = build_train_loader(ds, 19, image_size=SIZE, **kw)
    batch = next(loader)
    loader.close()
    assert sorted(batch.labels.tolist()) == sorted([0] * 6 + [1] * 6 + [2] * 6)
    assert [(key, "cannot decode image" in msg) for _, key, msg in batch.bad] == [("carol/broken.jpg", True)]
    loader = build_train_loader(ds, 19, image_size=SIZE, per_sample=True, **kw)
    assert_same([batch], [next(loader)])
    loader.close()


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_is_close_to_cpu_decode(mixed: Path) -> None:
    ds = RecordIODataset(mixed)
    cuda = torch.device("cuda")
    for transform in (None, build_transform(AUG)):
        kw = dict(seed=5, num_workers=2, transform=transform)
        gpu = batches(ds, 12, decode_device=cuda, **kw)
        cpu = batches(ds, 12, pin_memory=True, **kw)  # the pinning thread turns lent buffers into pinned batches
        for a, b in zip(gpu, cpu):
            assert a.images.device.type == "cuda"
            assert torch.equal(a.labels, b.labels) and torch.equal(a.indices, b.indices) and a.bad == b.bad
            diff = (a.images.cpu().float() - b.images.float()).abs()
            # nvJPEG's IDCT / upsampling differ from libjpeg-turbo's; augmentation resamples those pixels
            assert diff.mean() < 3.0, diff.mean()
    decoder = EncodedBatchDecoder(cuda, SIZE)
    assert decoder.device == cuda


def test_a_fast_batch_pickles(mixed: Path) -> None:
    """A handed-out batch is an ordinary object: it pickles (e.g. into a debug dump)."""
    import pickle

    batch = batches(RecordIODataset(mixed), 1, num_workers=0)[0]
    again = pickle.loads(pickle.dumps(batch))
    assert torch.equal(again.images, batch.images) and torch.equal(again.labels, batch.labels)
