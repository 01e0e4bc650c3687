"""Built-in demo data: real formats, determinism, held-out identities, atomic generation, caching."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from timmface.data import demo
from timmface.data.bin import read_bin
from timmface.data.demo import generate_demo_dataset, identity_parameters, load_or_generate_demo
from timmface.data.image import decode_image_bytes
from timmface.data.recordio import RecordIODataset
from timmface.errors import ConfigError, DataError

SMALL = dict(num_identities=4, images_per_identity=3, num_val_identities=3, num_val_pairs=7)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "d", seed=0, **SMALL)


def test_formats_and_sizes(small: Path) -> None:
    files = sorted(p.name for p in small.iterdir() if p.suffix != ".npz")  # ignore the reader's index cache
    assert files == ["demo.json", "demo_val.bin", "property", "train.idx", "train.rec"]
    ds = RecordIODataset(small)
    assert len(ds) == 12 and ds.num_classes == 4 and ds.image_size == (112, 112)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    img, label = ds[0]
    assert img.shape == (3, 112, 112) and img.dtype == torch.uint8 and label == 0
    assert not torch.equal(ds[0][0], ds[1][0])  # every image of an identity is a new draw
    images, issame = read_bin(small / "demo_val.bin")
    assert len(images) == 14 and len(issame) == 7
    assert sum(issame) == 3  # half same (rounded down), the rest different
    assert decode_image_bytes(images[0]).shape == (3, 112, 112)
    params = json.loads((small / "demo.json").read_text())
    assert params["num_identities"] == 4 and params["format_version"] == demo.FORMAT_VERSION


def test_deterministic_per_seed(small: Path, tmp_path: Path) -> None:
    again = generate_demo_dataset(tmp_path / "again", seed=0, **SMALL)
    other = generate_demo_dataset(tmp_path / "other", seed=1, **SMALL)
    for name in ("train.rec", "train.idx", "property", "demo_val.bin"):
        assert (again / name).read_bytes() == (small / name).read_bytes(), name
    assert (other / "train.rec").read_bytes() != (small / "train.rec").read_bytes()
    assert (other / "demo_val.bin").read_bytes() != (small / "demo_val.bin").read_bytes()


def test_held_out_identities_are_disjoint() -> None:
    train, val = identity_parameters(0, 50, 20)
    keys = sorted(train)
    flat = lambda p: np.concatenate([np.asarray(p[k], np.float64).reshape(len(p[k]), -1) for k in keys], 1)  # noqa: E731
    t, v = flat(train), flat(val)
    distances = np.sqrt(((t[:, None, :] - v[None, :, :]) ** 2).sum(-1))
    assert distances.min() > 0.05
    # and the held-out set does not depend on how many training identities there are
    _, val2 = identity_parameters(0, 7, 20)
    assert all(np.array_equal(val[k], val2[k]) for k in keys)


def test_pairs_balanced_and_mixed() -> None:
    left, right, issame = demo._val_pairs(np.random.default_rng(0), 10, 400)
    assert issame.sum() == 200
    assert np.all(left[issame] == right[issame]) and np.all(left[~issame] != right[~issame])
    # shuffled: every contiguous tenth (one fold of the 10-fold protocol) has both kinds
    assert all(0 < f.sum() < len(f) for f in np.array_split(issame, 10))


def test_generation_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("timmface.data.bin.write_bin", boom)
    with pytest.raises(RuntimeError):
        generate_demo_dataset(tmp_path / "d", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_bad_arguments(tmp_path: Path, small: Path) -> None:
    with pytest.raises(ConfigError, match="unknown knob 'posee'"):
        generate_demo_dataset(tmp_path / "x", posee=2.0, **SMALL)
    with pytest.raises(DataError, match="already exists"):
        generate_demo_dataset(small, **SMALL)


def test_difficulty_changes_variation() -> None:
    easy, easy_spread = demo._knob_scales(0.5, {})
    hard, hard_spread = demo._knob_scales(2.0, {"pose": 0.5})
    assert hard["lighting"] == pytest.approx(4 * easy["lighting"]) and hard["lighting"] > 0
    assert hard["pose"] == pytest.approx(0.5 * hard["lighting"])
    assert hard_spread < easy_spread


def test_load_or_generate_caches_and_is_safe_concurrently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = demo.generate_demo_dataset

    def counting(out, **params):
        calls.append(out)
        time.sleep(0.2)  # let the other thread arrive while this one generates
        return real(out, **params)

    monkeypatch.setattr(demo, "generate_demo_dataset", counting)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_or_generate_demo(tmp_path, **SMALL))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1]
    assert (results[0] / "train.rec").is_file()
    assert load_or_generate_demo(tmp_path, **SMALL) == results[0] and len(calls) == 1  # cached
    other = load_or_generate_demo(tmp_path, **{**SMALL, "seed": 3})
    assert other != results[0] and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        [results[0].name, other.name]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".gen", ".tmp"))]


def test_other_image_size(tmp_path: Path) -> None:
    out = generate_demo_dataset(
        tmp_path / "s", num_identities=2, images_per_identity=2, num_val_identities=2, num_val_pairs=2, image_size=48
    )
    ds = RecordIODataset(out)
    assert ds.image_size == (48, 48) and ds[0][0].shape == (3, 48, 48)
