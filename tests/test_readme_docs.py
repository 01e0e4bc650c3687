"""The README documents what the code does: the embedding file layout, ``data shards``, the default of
``distill.centres`` and where caches live -- checked against the code, so the two cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_toy_dataset
from tests.test_eval_cli import fake_run
from timmface.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def section(title: str) -> str:
    """The README text under the heading ``title`` (any level), up to the next heading of that level or above;
    ``#`` lines inside code blocks are comments, not headings."""
    level, out, fenced = 0, [], False
    for line in README.splitlines():
        fenced ^= line.startswith("```")
        heading = None if fenced or line.startswith("```") else re.match(r"(#+) (.*)", line)
        if level and heading and len(heading.group(1)) <= level:
            break
        if level:
            out.append(line)
        elif heading and heading.group(2) == title:
            level = len(heading.group(1))
    assert level, f"README has no section '{title}'"
    return "\n".join(out)


def backticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``timmface embed`` outputs with RecordIO keys and with path keys."""
    from torchvision.io import encode_png

    from tests.conftest import class_image

    root = tmp_path_factory.mktemp("readme_embed")
    data = write_toy_dataset(root / "toy", num_classes=2, per_class=2)
    run = fake_run(root / "run")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        (images / f"face{i}.png").write_bytes(encode_png(class_image(i, 0, 32)).numpy().tobytes())
    out = {"records": root / "records.safetensors", "paths": root / "paths.safetensors"}
    for source, target in ((data, out["records"]), (images, out["paths"])):
        args = ["embed", "--model", str(run), "--data", str(source), "--out", str(target), "--workers", "0"]
        assert main([*args, "--no-progress"]) == 0
    return out


def test_embeddings_section_names_every_tensor_and_metadata_key(embedded: dict[str, Path]):
    from safetensors import safe_open

    documented = backticked(section("Embeddings"))
    written: set[str] = set()
    for path in embedded.values():
        with safe_open(str(path), "np") as f:
            written |= set(f.keys()) | set(f.metadata())
    assert written - documented == set(), "written but not in the README"
    table = re.findall(r"^\| (`[^|]+`) \|", section("Embeddings"), re.M)
    in_table = {name for cell in table for name in re.findall(r"`([^`]+)`", cell)}
    assert in_table - written == set(), "in the README's table but never written"


def test_embeddings_section_code_reads_the_file(embedded: dict[str, Path]):
    code = re.search(r"```python\n(.*?)```", section("Embeddings"), re.S).group(1)
    for name, path in embedded.items():
        scope: dict = {}
        exec(code.replace('"faces.safetensors"', repr(str(path))), scope)  # the README's own snippet
        keys, emb = scope["keys"], scope["embeddings"]
        assert len(keys) == len(emb) and emb.ndim == 2
        if name == "paths":
            assert sorted(keys.tolist()) == ["face0.png", "face1.png", "face2.png"]
        else:
            assert keys.dtype == np.int64 and scope["labels"] is not None


def test_data_section_shows_a_working_data_shards_command():
    from timmface.data.wds import check_shard_pattern

    lines = [line for line in section("Data").splitlines() if line.startswith("timmface data shards ")]
    assert lines, "no `timmface data shards` command in the Data section"
    pattern = lines[0].split()[4]
    assert check_shard_pattern(pattern) == pattern
    assert "wds://" in section("Data")


def test_distillation_section_states_the_default_of_distill_centres():
    from timmface.config import Config

    text = section("Distillation")
    default = Config().distill.centres
    assert re.search(rf"`distill\.centres`[^|\n]*defaults? (?:is |to )?`{default}`", text), "default not stated"


def test_caches_section_states_the_rule_the_code_follows(tmp_path: Path, monkeypatch):
    from timmface.cache import cache_root
    from timmface.data.recordio import index_cache_path

    text = section("Caches")
    for name in ("TIMMFACE_CACHE", "XDG_CACHE_HOME", "~/.cache/timmface", "demo/", "idx/"):
        assert name in text, name
    monkeypatch.setenv("TIMMFACE_CACHE", str(tmp_path))
    assert index_cache_path(tmp_path / "d" / "train.idx").parent == cache_root() / "idx"
    assert "TIMMFACE_CACHE" in README.split("## Contents")[0]  # where the demo's data lives, on the first screen
