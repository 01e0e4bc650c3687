"""``timmface data pack`` never loses the user's files; a truncated ``train.rec`` is called truncated."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torchvision.io import encode_jpeg

from tests.conftest import class_image, write_toy_dataset
from timmface.cli import main
from timmface.errors import DataError


def _one_line(err: str, command: str) -> str:
    assert err.startswith(f"timmface {command}: error: ") and err.count("\n") == 1, err
    return err.strip()


def _image_folder(root: Path, identities: list[str]) -> dict[Path, bytes]:
    """``root/<identity>/<n>.jpg``; returns every file with its bytes."""
    files = {}
    for label, name in enumerate(identities):
        for s in range(2):
            path = root / name / f"{s}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_jpeg(class_image(label, s, 112), quality=90).numpy().tobytes())
            files[path] = path.read_bytes()
    return files


def _unchanged(files: dict[Path, bytes]) -> bool:
    return all(p.is_file() and p.read_bytes() == data for p, data in files.items())


# -------------------------------------------------------------------------------- item 14: output vs input


@pytest.mark.parametrize("where", ["inside", "equal", "above"])
def test_pack_refuses_an_output_inside_equal_to_or_above_its_input(where: str, tmp_path: Path, capsys):
    src = tmp_path / "faces"
    files = _image_folder(src, ["alice", "bob", "sub"])
    out = {"inside": src / "sub", "equal": src, "above": tmp_path}[where]
    assert main(["data", "pack", str(src), str(out), "--overwrite"]) == 2  # 'above': OUT_DIR holds IMAGE_FOLDER
    line = _one_line(capsys.readouterr().err, "data pack")
    assert str(src) in line and ("inside" in line or "same folder" in line or "holds" in line)
    assert _unchanged(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]  # no temporary folder left behind


def test_pack_refuses_a_symlinked_output_that_is_the_input(tmp_path: Path, capsys):
    src = tmp_path / "faces"
    files = _image_folder(src, ["alice", "bob"])
    link = tmp_path / "link"
    link.symlink_to(src / "alice")
    assert main(["data", "pack", str(src), str(link), "--overwrite"]) == 2
    _one_line(capsys.readouterr().err, "data pack")
    assert _unchanged(files)


# ------------------------------------------------------------- items 13 and 14: what --overwrite replaces


def test_pack_without_overwrite_names_the_flag(tmp_path: Path, capsys):
    src = tmp_path / "faces"
    _image_folder(src, ["alice", "bob"])
    out = tmp_path / "packed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["data", "pack", str(src), str(out)]) == 2
    line = _one_line(capsys.readouterr().err, "data pack")
    assert "--overwrite" in line and "overwrite=True" not in line
    assert (out / "notes.txt").read_text() == "mine"


def test_pack_overwrite_replaces_a_previous_pack(tmp_path: Path, capsys):
    src = tmp_path / "faces"
    _image_folder(src, ["alice", "bob"])
    out = tmp_path / "packed"
    assert main(["data", "pack", str(src), str(out)]) == 0
    _image_folder(src, ["alice", "bob", "carol"])
    assert main(["data", "pack", str(src), str(out), "--overwrite"]) == 0
    assert (out / "property").read_text().startswith("3,")
    assert sorted(p.name for p in out.iterdir()) == ["property", "train.idx", "train.rec"]


def test_pack_overwrite_refuses_a_folder_that_is_not_a_previous_pack(tmp_path: Path, capsys):
    """``--overwrite`` on a folder of other files (a dataset with its .bin sets, a home folder) names them."""
    src = tmp_path / "faces"
    _image_folder(src, ["alice", "bob"])
    out = write_toy_dataset(tmp_path / "ms1m", num_classes=2, per_class=2)  # train.rec/.idx/property + toy_val.bin
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["data", "pack", str(src), str(out), "--overwrite"]) == 2
    line = _one_line(capsys.readouterr().err, "data pack")
    assert "notes.txt" in line and "toy_val.bin" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------ item 12: truncated train.rec


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_rec_says_truncated_and_gives_both_sizes(keep: float, tmp_path: Path):
    from timmface.data.recordio import RecordIODataset

    root = write_toy_dataset(tmp_path / "toy", num_classes=4, per_class=6)
    rec = root / "train.rec"
    full = rec.stat().st_size
    os.truncate(rec, int(full * keep))
    with pytest.raises(DataError) as e:
        RecordIODataset(root, index_cache=False)
    msg = str(e.value)
    assert "\n" not in msg and "does not belong" not in msg
    assert "truncated" in msg and f"{int(full * keep)} bytes" in msg
    # what the index expects: at least up to the last record it lists (the last record ends the file here)
    expected = int(msg.split("expects at least ")[1].split(" bytes")[0])
    assert int(full * keep) < expected <= full


def test_truncated_rec_through_the_cli(tmp_path: Path, capsys):
    root = write_toy_dataset(tmp_path / "toy", num_classes=4, per_class=6)
    os.truncate(root / "train.rec", 1000)
    assert main(["data", "inspect", str(root)]) == 2
    line = _one_line(capsys.readouterr().err, "data inspect")
    assert "truncated" in line and "1000 bytes" in line
