"""Config: defaults <- YAML <- key=value overrides; unknown keys and wrong types named in one line."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from timmface.config import Config, config_from_dict, load_config, save_config, valid_keys
from timmface.errors import ConfigError

REQUIRED = [
    "output_dir", "total_steps", "batch_size", "seed", "eval_every", "save_every", "resume",
    "data.path", "model.backbone", "model.kwargs", "loss.name",
]  # fmt: skip


def test_required_keys_exist():
    keys = set(valid_keys())
    assert set(REQUIRED) <= keys


def test_yaml_then_overrides(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "total_steps: 100\noptim: {lr: 1.0e-3, name: sgd}\nmodel:\n  backbone: convnext_atto\n"
        "  kwargs: {patch_size: 2, drop_path_rate: 0.1}\n"
    )
    cfg = load_config(f, ["optim.lr=5e-4", "model.kwargs.patch_size=4", "total_steps=200_000", "loss.name=arcface"])
    assert cfg.total_steps == 200_000
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 5e-4 as a string
    assert cfg.optim.name == "sgd"
    assert cfg.model.kwargs == {"patch_size": 4, "drop_path_rate": 0.1}  # merged, not replaced
    assert cfg.loss.name == "arcface"
    assert cfg.batch_size == Config().batch_size  # untouched default


def test_unknown_key_names_key_and_closest(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lr' \(did you mean 'optim.lr'\?\)"):
        load_config(None, ["lr=1"])
    f = tmp_path / "bad.yaml"
    f.write_text("total_step: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg and "'total_step'" in msg and "'total_steps'" in msg and "\n" not in msg


def test_wrong_types_fail_with_key():
    with pytest.raises(ConfigError, match=r"config key 'total_steps' expects int, got 'lots'"):
        load_config(None, ["total_steps=lots"])
    with pytest.raises(ConfigError, match=r"config key 'ema.enabled' expects bool"):
        load_config(None, ["ema.enabled=3"])
    with pytest.raises(ConfigError, match=r"'loss.name': 'cosfase' is not one of .*did you mean 'cosface'"):
        load_config(None, ["loss.name=cosfase"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["optim=3"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["batch_size=10", "optim.grad_accum=3"])


def test_text_keys_take_the_word_as_typed(tmp_path: Path):
    """YAML reads a bare ``off`` as False and ``2024`` as an int: on the command line a text key gets the
    word itself; in a file (where the text is gone) the error says to quote it."""
    cfg = load_config(None, ["log.progress=off", "output_dir=2024", "model.backbone=1e3", "ema.enabled=off"])
    assert cfg.log.progress == "off" and cfg.output_dir == "2024" and cfg.model.backbone == "1e3"
    assert cfg.ema.enabled is False  # a bool key still reads YAML's booleans
    assert load_config(None, ["total_steps=12"]).total_steps == 12
    f = tmp_path / "c.yaml"
    f.write_text("log: {progress: off}\n")
    with pytest.raises(ConfigError, match=r"'log.progress' expects str, got False \(YAML reads .* quote the word\)"):
        load_config(f)


def test_values_are_data_not_code():
    cfg = load_config(None, ["output_dir=__import__('os').system('x')"])
    assert cfg.output_dir == "__import__('os').system('x')"


def test_saved_config_round_trips(tmp_path: Path):
    cfg = load_config(None, ["model.kwargs.img_size=112", "data.augmentations=[{name: ColorJitter, args: [0.1]}]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert asdict(again) == asdict(cfg)
    assert asdict(config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))) == asdict(cfg)


def test_base_chain(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("total_steps: 7\nbatch_size: 8\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nbatch_size: 16\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.total_steps, cfg.batch_size) == (7, 16)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path):
    cfg = load_config(path)
    assert cfg.model.backbone
