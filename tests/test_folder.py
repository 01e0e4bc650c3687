"""ImageFolderDataset: root/<identity>/<image>."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_image, encode_jpeg, encode_png

from timmface.data.folder import ImageFolderDataset
from timmface.errors import CorruptRecordError, DataError


def image(seed: int, channels: int = 3, h: int = 12, w: int = 10) -> torch.Tensor:
    return torch.randint(0, 256, (channels, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    # created out of order: labels must follow the sorted names
    for name, files in {
        "carol": {"1.jpg": encode_jpeg(image(1)), "2.PNG": encode_png(image(2))},
        "alice": {"b.jpeg": encode_jpeg(image(3)), "a.jpg": encode_jpeg(image(4, channels=1))},
        "bob": {"sub/x.png": encode_png(image(5)), "notes.txt": None, "thumbs.db": None},
        "dave": {"readme.md": None},  # no images: skipped, no label
    }.items():
        for rel, data in files.items():
            path = root / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes(data.numpy()) if data is not None else b"not an image")
    (root / "stray.txt").write_text("x")
    (root / ".hidden").mkdir()
    return root


def test_labels_keys_and_items(tree: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(tree)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert any("skipped 4 files that are not images" in m for m in messages)  # 3 in folders + stray.txt
    assert any("1 identity folders have no images" in m and "'dave'" in m for m in messages)
    assert ds.classes == ["alice", "bob", "carol"] and ds.num_classes == 3
    assert list(ds.keys) == ["alice/a.jpg", "alice/b.jpeg", "bob/sub/x.png", "carol/1.jpg", "carol/2.PNG"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 2, 2]
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 12, 10)  # grayscale comes back as RGB
        assert isinstance(label, int) and label == ds.labels[i]
        raw, raw_label = ds.read_raw(i)
        assert raw == (tree / ds.keys[i]).read_bytes() and raw_label == label
    png = decode_image(torch.frombuffer(bytearray((tree / "bob/sub/x.png").read_bytes()), dtype=torch.uint8))
    assert torch.equal(ds[2][0], png)  # lossless: exact pixels
    assert ds.image_size == (12, 10)
    assert torch.equal(pickle.loads(pickle.dumps(ds))[4][0], ds[4][0])


def test_transform(tree: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = ImageFolderDataset(tree, transform=lambda x: x[:, :4, :4])
    assert ds[0][0].shape == (3, 4, 4)


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing: no such image folder"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "e" / "a").mkdir(parents=True)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="e: no images found"):
        ImageFolderDataset(tmp_path / "e")


def test_corrupt_image(tmp_path: Path) -> None:
    (tmp_path / "r" / "a").mkdir(parents=True)
    (tmp_path / "r" / "a" / "x.jpg").write_bytes(b"\xff\xd8 broken")
    ds = ImageFolderDataset(tmp_path / "r")
    with pytest.raises(CorruptRecordError) as info:
        ds[0]
    assert info.value.key == "a/x.jpg"
