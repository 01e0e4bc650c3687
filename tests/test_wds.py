"""WebDataset shards: written from RecordIO, read back through the streaming loader (same pixels and
labels), split disjointly over ranks, resumed exactly, trained on by the real trainer."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_same_weights, tiny_run_args, whole_and_resumed
from tests.test_pipeline import AUG, SIZE, assert_same, jpeg, write_mixed_recordio
from timmface.config import load_config
from timmface.data.loader import SampleDataset, build_dataset, build_train_loader, dataset_num_classes
from timmface.data.recordio import RecordIODataset
from timmface.data.transforms import build_transform
from timmface.data.wds import WebDatasetShards, expand_shards, worker_skips, write_shards
from timmface.errors import ConfigError, DataError
from timmface.trainer import Trainer

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 images, 5 classes; image 13 is corrupt, some are 20x24 (resized when read)."""
    return write_mixed_recordio(tmp_path_factory.mktemp("wds") / "rec")


@pytest.fixture(scope="module")
def shards(rec: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four shards of 12, 12, 12 and 4 samples."""
    out = tmp_path_factory.mktemp("shards")
    meta = write_shards(RecordIODataset(rec), out / "faces-%06d.tar", max_count=12)
    assert meta["shards"] == {f"faces-{i:06d}.tar": n for i, n in enumerate([12, 12, 12, 4])}
    return f"wds://{out}/faces-{{000000..000003}}.tar"


def loader_for(path: str, global_batch: int = 4, **kw):
    ds = build_dataset(path)
    dataset_num_classes(ds, kw.pop("num_classes", 0))
    kw.setdefault("num_workers", 0)
    return build_train_loader(ds, global_batch, image_size=SIZE, prefetch_factor=2, **kw)


def one_epoch(loader) -> list:
    n = loader.batches_per_epoch()
    out = [next(loader) for _ in range(n)]
    assert loader.state_dict()["batch"] == n
    return out


def test_shards_read_back_the_same_pixels_and_labels(rec: Path, shards: str) -> None:
    ds = RecordIODataset(rec)
    reference = SampleDataset(ds, image_size=SIZE)
    loader = loader_for(shards)
    batches = one_epoch(loader)
    seen = []
    for batch in batches:
        for row, i in enumerate(batch.indices.tolist()):
            image, label, _, _ = reference[(i, 0, False)]
            assert torch.equal(batch.images[row], image) and int(batch.labels[row]) == label == int(ds.labels[i])
            seen.append(i)
    bad = [b for batch in batches for b in batch.bad]
    assert [(i, key) for i, key, _ in bad] == [(13, "000000013")] and "cannot decode image" in bad[0][2]
    assert bad[0][2].startswith(expand_shards(shards)[0].rsplit("/", 1)[0])  # names the shard
    assert sorted(seen + [i for i, _, _ in bad]) == list(range(40))  # every sample once per epoch
    assert sum(b.resized for b in batches) > 0
    next(loader)
    assert loader.state_dict() == {"epoch": 1, "batch": 1, "stream": 1}


def test_two_ranks_read_disjoint_shards_that_cover_the_set(shards: str) -> None:
    per_rank = []
    for rank in range(2):
        loader = loader_for(shards, 8, rank=rank, world_size=2, num_workers=2, seed=3)
        batches = one_epoch(loader)
        loader.close()
        per_rank.append({i for b in batches for i in [*b.indices.tolist(), *(x[0] for x in b.bad)]})
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(range(40))


@pytest.mark.parametrize("aug", [False, True])
def test_resume_mid_epoch_is_exact(shards: str, aug: bool) -> None:
    """Two workers with unequal shares on rank 0 of 2; every saved position of the epoch (with a worker
    whose turn is next other than the first, and after a worker ran dry); resumed batches run into the
    next epoch."""
    kw = dict(num_workers=2, seed=2, rank=0, world_size=2, transform=build_transform(AUG) if aug else None)
    a = loader_for(shards, 8, **kw)
    total = a.batches_per_epoch()
    assert total >= 3 and a._batches_per_worker(0)[0] != a._batches_per_worker(0)[1]
    run = [next(a) for _ in range(2 * total + 1)]
    a.close()
    for position in range(1, total + 1):
        b = loader_for(shards, 8, **kw)
        b.load_state_dict({"epoch": 0, "batch": position, "stream": 1})
        got = [next(b) for _ in range(total + 1)]
        b.close()
        assert_same(got, run[position : position + total + 1])


def test_worker_skips_follow_the_dataloaders_turns() -> None:
    assert worker_skips([3, 3], 4) == ([2, 2], 0)
    assert worker_skips([3, 3], 3) == ([2, 1], 1)
    assert worker_skips([3, 1], 3) == ([2, 1], 1)
    assert worker_skips([3, 1], 4) == ([3, 1], 1)  # worker 1 ran dry after its one batch
    assert worker_skips([1, 4, 2], 6) == ([1, 3, 2], 2)


def test_shipped_bytes_decoded_on_a_cpu_device_give_the_cpu_batches(shards: str) -> None:
    kw = dict(num_workers=2, seed=2, transform=build_transform(AUG))
    cpu = loader_for(shards, **kw)
    shipped = loader_for(shards, decode_device=torch.device("cpu"), **kw)
    assert_same([next(shipped) for _ in range(8)], [next(cpu) for _ in range(8)])
    cpu.close()
    shipped.close()


def test_num_classes_from_meta_classes_txt_or_config(shards: str, tmp_path: Path) -> None:
    assert build_dataset(shards).num_classes == 5
    folder = Path(expand_shards(shards)[0]).parent
    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in expand_shards(shards):
        (bare / Path(shard).name).write_bytes(Path(shard).read_bytes())
    path = f"wds://{bare}/faces-*.tar"  # a glob
    ds = build_dataset(path)
    assert len(ds.urls) == 4 and ds.counts is None and len(ds) == 0
    with pytest.raises(ConfigError, match="no meta.json or classes.txt beside the shards; set data.num_classes"):
        dataset_num_classes(ds)
    assert dataset_num_classes(ds, 7) == 7
    (bare / "classes.txt").write_text("a\nb\nc\nd\ne\n")
    assert build_dataset(path).num_classes == 5
    # without counts batches still stream; indices are unknown (-1)
    loader = loader_for(path, num_classes=5)
    batch = next(loader)
    assert (batch.indices == -1).all() and len(batch.labels) + len(batch.bad) == 4
    assert json.loads((folder / "meta.json").read_text())["index_keys"] is True


def test_bad_shards_and_labels(shards: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no WebDataset shards match"):
        expand_shards(f"wds://{tmp_path}/none-*.tar")
    with pytest.raises(DataError, match=r"nope-000000.tar: shard not found \(2 of 2 missing\)"):
        expand_shards(f"wds://{tmp_path}/nope-{{000000..000001}}.tar")
    shard = tmp_path / "labels-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("a.jpg", jpeg(0, 0)), ("a.cls", b"9")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "classes.txt").write_text("a\nb\n")
    loader = loader_for(f"wds://{shard}", 1, num_workers=1)
    with pytest.raises(DataError) as info:
        next(loader)
    loader.close()
    assert "\n" not in str(info.value) and "key a has label 9, outside [0, 2)" in str(info.value)


@pytest.mark.slow
def test_trainer_resumes_a_stream_exactly(toy_data: Path, tmp_path: Path) -> None:
    """The real trainer on shards written from the toy RecordIO set: a run stopped at step 3 and resumed
    gives the uninterrupted run's losses and weights."""
    write_shards(RecordIODataset(toy_data), tmp_path / "s" / "toy-%03d.tar", max_count=10)
    path = f"wds://{tmp_path}/s/toy-{{000..004}}.tar"
    base = ["save_every=0", "total_steps=8", "eval_every=0", "data.num_workers=2"]

    def make(out: Path, more: list[str]) -> Trainer:
        args = tiny_run_args(path, out, *base, *more)  # type: ignore[arg-type]  # (Path() would eat a slash)
        return Trainer(load_config(None, args))

    whole, second = whole_and_resumed(make, tmp_path / "a", tmp_path / "b", until=3)
    assert_same_weights(whole.model, second.model)
    assert isinstance(whole.dataset, WebDatasetShards) and len(whole.dataset) == 48


def test_cli_writes_shards_of_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.test_pipeline import write_messy_folder
    from timmface.cli import main

    folder = write_messy_folder(tmp_path / "faces")
    out = tmp_path / "out" / "faces-%04d.tar"
    with pytest.warns(UserWarning):
        assert main(["data", "shards", str(folder), str(out), "--max-count", "8"]) == 0
    assert "3 shards, 19 samples of 3 classes" in capsys.readouterr().out
    assert (tmp_path / "out" / "classes.txt").read_text().split() == ["alice", "bob", "carol"]
    ds = build_dataset(f"wds://{tmp_path}/out/faces-{{0000..0002}}.tar")
    assert ds.num_classes == 3 and ds.counts == [8, 8, 3] and len(ds) == 19
    loader = loader_for(f"wds://{tmp_path}/out/faces-{{0000..0002}}.tar", 4, num_workers=1)
    batches = one_epoch(loader)
    loader.close()
    indices = sorted([i for b in batches for i in b.indices.tolist()] + [x[0] for b in batches for x in b.bad])
    assert len(indices) == len(set(indices)) and set(indices) <= set(range(19))  # partial batches are dropped
