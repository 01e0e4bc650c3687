"""The harder demo preset (configs/demo_hard*.yaml, configs/demo_distill.yaml) and the distillation table's rows.

The table in ``benchmarks/distill_demo.py`` is only a fair comparison if every row trains the same student
on the same data with the same budget and differs from the scratch run in its distillation keys alone, and
if the teacher saw exactly that data: these tests pin those contracts, and that the harder preset really is
harder (more within-identity variation against the spread between identities).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from timmface.config import diff_configs, load_config, to_dict
from timmface.data.demo import generate_demo_dataset
from timmface.data.recordio import RecordIODataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _load(name: str):
    return load_config(CONFIGS / f"{name}.yaml")


def _diff(a: str, b: str) -> set[str]:
    return set(diff_configs(to_dict(_load(a)), to_dict(_load(b))))


def test_hard_preset_is_a_harder_version_of_the_demo() -> None:
    easy, hard = _load("demo").data, _load("demo_hard").data
    assert hard.demo.enabled
    assert hard.demo.difficulty > easy.demo.difficulty
    assert hard.demo.images_per_identity < easy.demo.images_per_identity
    assert hard.demo.num_identities > easy.demo.num_identities
    assert hard.demo.num_val_pairs >= easy.demo.num_val_pairs  # a steadier accuracy, not a noisier one
    assert hard.image_size < easy.image_size  # cheaper steps: the 3-seed table must fit on 2 CPU cores
    assert _load("demo_hard").total_steps < _load("demo").total_steps  # minutes per run, even on 2 cores
    # the same student and recipe as the demo: only the data, the budget and the run folder change
    assert {k.split(".")[0] for k in _diff("demo", "demo_hard")} <= {
        "data",
        "output_dir",
        "total_steps",
        "eval_every",
        "save_every",
    }


def test_teacher_sees_the_students_data_and_is_bigger_and_longer() -> None:
    changed = _diff("demo_hard", "demo_hard_teacher")
    assert not [k for k in changed if k.startswith("data.")]  # the cache's dataset fingerprint must match
    student, teacher = _load("demo_hard"), _load("demo_hard_teacher")
    assert teacher.model.backbone != student.model.backbone
    assert teacher.total_steps > student.total_steps
    assert teacher.model.embed_dim == student.model.embed_dim  # teacher centres / logit KD need equal sizes


def test_recommended_distillation_differs_from_scratch_only_in_distillation_keys() -> None:
    changed = _diff("demo_hard", "demo_distill")
    assert changed, "configs/demo_distill.yaml adds no distillation key"
    assert all(k.startswith("distill.") or k == "output_dir" for k in changed), sorted(changed)


def _table_module():
    spec = importlib.util.spec_from_file_location("distill_demo", ROOT / "benchmarks" / "distill_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("distill_demo", module)
    spec.loader.exec_module(module)
    return module


def test_table_rows_are_valid_distillation_configs(tmp_path: Path) -> None:
    """Every method row of the table resolves against this tree's schema (a renamed key fails here, not
    after an hour of training), and differs from the scratch run only under distill.*."""
    table = _table_module()
    names = [name for name, _ in table.ROWS]
    assert names[0] == "scratch" and "best" in names and len(set(names)) == len(names)
    scratch = to_dict(load_config(table.STUDENT))
    for name, keys in table.ROWS:
        command, config, overrides = table.row_command(name, keys, tmp_path / "teacher.tfemb")
        assert command == ("train" if keys is None else "distill")
        cfg = load_config(config, overrides)
        changed = diff_configs(scratch, to_dict(cfg))
        assert all(k.startswith("distill.") or k == "output_dir" for k in changed), (name, changed)
        if keys is not None:
            assert cfg.distill.cache == str(tmp_path / "teacher.tfemb")


def _within_over_between(difficulty: float, tmp: Path) -> float:
    """Mean pixel distance between two images of one identity over that between two identities."""
    out = generate_demo_dataset(
        tmp / f"d{difficulty}", num_identities=8, images_per_identity=8, num_val_pairs=0, image_size=32,
        difficulty=difficulty, seed=0,
    )  # fmt: skip
    ds = RecordIODataset(out)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).double().flatten(1)
    labels = torch.as_tensor(ds.labels)
    dist = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    other = ~torch.eye(len(x), dtype=torch.bool)
    return float(dist[same & other].mean() / dist[~same].mean())


def test_hard_preset_images_vary_more_within_an_identity(tmp_path: Path) -> None:
    # measured (8 identities x 8 images, 32 px, seeds 0-2): difficulty 1.0 -> 0.56-0.70, 1.5 -> 0.72-0.84
    easy = _within_over_between(_load("demo").data.demo.difficulty, tmp_path)
    hard = _within_over_between(_load("demo_hard").data.demo.difficulty, tmp_path)
    assert hard > easy + 0.08, (easy, hard)
    assert hard < 1.0  # still learnable: two images of one identity are closer than two identities


@pytest.mark.parametrize(
    "saved_amp, amp, same",
    [("none", "none", True), ("none", "bfloat16", False)],
)
def test_table_reuses_a_finished_run_only_for_the_same_config(
    tmp_path: Path, saved_amp: str, amp: str, same: bool
) -> None:
    import json

    import yaml

    table = _table_module()
    run = tmp_path / "run"
    run.mkdir()
    # the table starts each run with overwrite=true and asks for it without: the same run
    cfg = load_config(table.STUDENT, [f"amp={saved_amp}", f"output_dir={run}", "overwrite=true"])
    saved = to_dict(cfg)
    del saved["distill"]["cache"]  # a key the schema gained after the run: taken to be at its default
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 500, "acc/demo_val": 0.5})
        + "\n"
        + json.dumps({"step": cfg.total_steps, "acc/demo_val": 0.75})
    )
    got = table.finished(run, table.STUDENT, [f"amp={amp}", f"output_dir={run}"])
    assert got == (0.75 if same else None)
    # a run that stopped before total_steps is run again
    (run / "metrics.jsonl").write_text(json.dumps({"step": 500, "acc/demo_val": 0.5}) + "\n")
    assert table.finished(run, table.STUDENT, [f"amp={saved_amp}", f"output_dir={run}"]) is None
