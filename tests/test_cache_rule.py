"""One cache rule for every command: timmface's caches (the demo data, parsed ``train.idx`` indexes) live under
``$TIMMFACE_CACHE``, else ``$XDG_CACHE_HOME/timmface``, else ``~/.cache/timmface``; nothing is written into a
dataset's own folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_toy_dataset
from timmface.cli import main


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_toy_dataset(tmp_path / "toy", num_classes=3, per_class=3)


def _listing(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.mark.parametrize(
    "env,where",
    [
        ({"TIMMFACE_CACHE": "tf"}, "tf"),
        ({"XDG_CACHE_HOME": "xdg"}, "xdg/timmface"),
        ({}, "home/.cache/timmface"),
    ],
)
def test_cache_root_follows_timmface_cache_then_xdg_then_home(env: dict, where: str, tmp_path: Path, monkeypatch):
    from timmface.cache import cache_root

    monkeypatch.delenv("TIMMFACE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for key, value in env.items():
        monkeypatch.setenv(key, str(tmp_path / value))
    assert cache_root() == tmp_path / where


def test_index_cache_goes_under_timmface_cache_and_never_into_the_dataset(data: Path, tmp_path: Path, monkeypatch):
    from timmface.data.recordio import RecordIODataset

    monkeypatch.setenv("TIMMFACE_CACHE", str(tmp_path / "cache"))
    before = _listing(data)
    RecordIODataset(data)
    assert _listing(data) == before
    cached = list((tmp_path / "cache" / "idx").glob("*.npz"))
    assert len(cached) == 1
    assert RecordIODataset(data).labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # read back from the cache


def test_the_cached_index_is_used(data: Path, tmp_path: Path, monkeypatch):
    from timmface.data import recordio

    monkeypatch.setenv("TIMMFACE_CACHE", str(tmp_path / "cache"))
    recordio.RecordIODataset(data)
    calls = []
    real = recordio.parse_idx
    monkeypatch.setattr(recordio, "parse_idx", lambda *a: calls.append(1) or real(*a))
    recordio.RecordIODataset(data)
    assert calls == []


def test_data_inspect_writes_nothing_into_the_dataset(data: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("TIMMFACE_CACHE", str(tmp_path / "cache"))
    before = _listing(data)
    assert main(["data", "inspect", str(data)]) == 0
    assert main(["data", "inspect", str(data / "toy_val.bin")]) == 0
    assert _listing(data) == before


def test_demo_data_uses_the_same_root(tmp_path: Path, monkeypatch):
    from timmface.config import load_config
    from timmface.trainer import demo_data_path

    monkeypatch.setenv("TIMMFACE_CACHE", str(tmp_path / "cache"))
    demo = load_config(None, ["data.demo.num_identities=3", "data.demo.images_per_identity=2",
                              "data.demo.num_val_identities=2", "data.demo.num_val_pairs=10"]).data.demo  # fmt: skip
    folder = Path(demo_data_path(demo))
    assert folder.parent == tmp_path / "cache" / "demo"
