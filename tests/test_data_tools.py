"""pack_image_folder, inspect_dataset and the `timmface data` command."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_image, encode_jpeg, encode_png

from timmface.cli import main
from timmface.data.bin import write_bin
from timmface.data.recordio import RecordIODataset
from timmface.data.tools import inspect_dataset, jpeg_size, pack_image_folder
from timmface.errors import DataError


def image(seed: int, h: int = 112, w: int = 112) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, 6, 6), generator=g, dtype=torch.uint8)
    return torch.nn.functional.interpolate(small[None].float(), size=(h, w), mode="bilinear")[0].to(torch.uint8)


def decode(data: bytes) -> torch.Tensor:
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    files = {
        "a/1.jpg": bytes(encode_jpeg(image(1), quality=80).numpy()),
        "a/2.jpg": bytes(encode_jpeg(image(2), quality=80).numpy()),
        "b/1.png": bytes(encode_png(image(3)).numpy()),
        "b/2.jpg": bytes(encode_jpeg(image(4, 64, 64)).numpy()),
        "c/1.jpg": b"\xff\xd8\xff\xe0 broken",
        "c/2.jpg": bytes(encode_jpeg(image(5)).numpy()),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_jpeg_size() -> None:
    assert jpeg_size(bytes(encode_jpeg(image(0, 30, 40)).numpy())) == (30, 40)
    assert jpeg_size(b"\x89PNG....") is None
    assert jpeg_size(b"\xff\xd8\xff") is None


def test_pack_then_read_back(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = pack_image_folder(folder, out, quality=95)
    messages = [str(w.message) for w in caught]
    assert any("resized 1 images to 112x112" in m for m in messages)
    assert any("skipped 1 unreadable images (first: c/1.jpg)" in m for m in messages)
    assert info["copied"] == 3 and info["reencoded"] == 1 and info["resized"] == 1 and info["skipped"] == 1
    ds = RecordIODataset(out)
    assert ds.num_classes == 3 and ds.image_size == (112, 112)
    assert ds.labels.tolist() == [0, 0, 1, 1, 2]
    for i, rel in [(0, "a/1.jpg"), (1, "a/2.jpg"), (4, "c/2.jpg")]:
        raw, label = ds.read_raw(i)
        assert bytes(raw) == (folder / rel).read_bytes()  # already 112x112 JPEG: copied byte for byte
        assert torch.equal(ds[i][0], decode((folder / rel).read_bytes()))
    png = decode((folder / "b/1.png").read_bytes())
    assert (ds[2][0].float() - png.float()).abs().mean() < 3  # re-encoded at quality 95
    assert ds[3][0].shape == (3, 112, 112)


def test_pack_refuses_other_sizes_without_resize(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"b/2.jpg: is 64x64, expected 112x112"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pack_image_folder(folder, tmp_path / "rec", resize=False)
    assert not (tmp_path / "rec").exists()


def test_inspect_counts_and_grid(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pack_image_folder(folder, out)
    grid = tmp_path / "grid.png"
    info = inspect_dataset(out, grid_png=grid, identities=2, per_identity=3)
    assert info["format"] == "recordio"
    assert info["images"] == 5 and info["identities"] == 3 and info["empty_identities"] == 0
    assert info["images_per_identity"] == {"min": 1, "median": 2.0, "max": 2}
    assert info["image_size"] == [112, 112]
    png = decode(grid.read_bytes())
    assert png.shape == (3, 2 + 2 * 114, 2 + 3 * 114)  # 2 identities x 3 columns, padding 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder_info = inspect_dataset(folder)
    assert folder_info["format"] == "folder" and folder_info["images"] == 6


def test_inspect_bin(tmp_path: Path) -> None:
    images = [bytes(encode_jpeg(image(i)).numpy()) for i in range(6)]
    path = write_bin(tmp_path / "v.bin", images, [True, False, True])
    info = inspect_dataset(path, grid_png=tmp_path / "g.png")
    assert (info["pairs"], info["same"], info["different"], info["images"]) == (3, 2, 1, 6)
    assert info["image_size"] == [112, 112] and (tmp_path / "g.png").is_file()


def test_cli_pack_and_inspect(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rec"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["data", "pack", str(folder), str(out)]) == 0
    assert "5 images of 3 identities" in capsys.readouterr().out
    grid = tmp_path / "g.png"
    assert main(["data", "inspect", str(out), "--grid", str(grid), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 5 and grid.is_file()
    assert main(["data", "inspect", str(out)]) == 0
    assert "images per identity" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such dataset" in capsys.readouterr().err
    assert np.array_equal(RecordIODataset(out).labels, [0, 0, 1, 1, 2])
