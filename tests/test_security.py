"""Nothing timmface reads can run code, and nothing it writes leaves the folder it was given.

Every malicious file here is live: loaded the unsafe way (``pickle.loads``, ``torch.load(weights_only=False)``,
``yaml.unsafe_load``) it creates a marker file. Each test loads it through timmface -- the trainer's resume,
``timmface eval --model``, ``timmface export``, ``timmface ckpt merge``, teachers, ``.bin`` files, configs
-- and asserts that the marker does not exist and that the error is one line naming the file.
"""

from __future__ import annotations

import argparse
import copyreg
import os
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import tiny_run_args
from tests.test_eval_cli import fake_run
from timmface.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from timmface.cli import main
from timmface.errors import CheckpointError, ConfigError, DataError, TeacherError

# --------------------------------------------------------------------------------------------------
# Payloads: objects whose unpickling creates ``marker``
# --------------------------------------------------------------------------------------------------


def _touch(marker: str) -> None:
    Path(marker).touch()


class Reduce:
    """REDUCE of a function that writes a file (what most real attacks use)."""

    def __init__(self, marker: Path, how: str = "system") -> None:
        self.marker, self.how = str(marker), how

    def __reduce__(self) -> tuple:
        if self.how == "exec":
            return (exec, (f"open({self.marker!r}, 'w').close()",))
        if self.how == "open":
            return (open, (self.marker, "w"))
        return (os.system, (f"touch {self.marker}",))


class Build:
    """A class whose ``__setstate__`` (BUILD) writes the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        _touch(state["marker"])


class NewObj:
    """NEWOBJ: ``cls.__new__`` writes the file (protocol >= 2 pickles it as NEWOBJ / NEWOBJ_EX)."""

    def __new__(cls, marker: str = "") -> NewObj:
        if marker:
            _touch(marker)
        return super().__new__(cls)

    def __init__(self, marker: str = "") -> None:
        self.marker = marker

    def __reduce_ex__(self, protocol: int) -> tuple:
        return (copyreg.__newobj__, (NewObj, self.marker))


def payload(kind: str, marker: Path) -> Any:
    """The payload ``kind``, built only when asked for (building a NewObj with a marker writes it)."""
    if kind == "newobj":
        obj = object.__new__(NewObj)
        obj.marker = str(marker)
        return obj
    factories = {
        "reduce-system": lambda: Reduce(marker),
        "reduce-exec": lambda: Reduce(marker, "exec"),
        "reduce-open": lambda: Reduce(marker, "open"),
        "build": lambda: Build(marker),
        "global": lambda: _touch,  # a bare reference to a code object (a GLOBAL / STACK_GLOBAL, nothing called)
    }
    return factories[kind]()


@pytest.mark.parametrize("kind", ["reduce-system", "reduce-exec", "reduce-open", "build", "newobj"])
def test_payloads_are_live(tmp_path: Path, kind: str) -> None:
    """The premise of every test below: unsafe loading of these objects writes the marker."""
    marker = tmp_path / "m"
    pickle.loads(pickle.dumps(payload(kind, marker), protocol=2))
    assert marker.exists(), kind


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.lstrip().startswith(("warnings.warn", "result ="))]
    lines = [line for line in lines if "Warning" not in line]
    assert len(lines) == 1, lines
    return lines[0]


def _evil_checkpoint(path: Path, marker: Path, kind: str = "reduce-system", protocol: int = 2) -> Path:
    """A file that looks like a timmface checkpoint, with a payload among its entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": "timmface", "version": 1, "step": 2, "model": {"w": torch.zeros(2)}, "x": payload(kind, marker)}
    torch.save(state, path, pickle_protocol=protocol)
    return path


# --------------------------------------------------------------------------------------------------
# Checkpoints: resume, eval --model, export, ckpt merge
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("kind", ["reduce-system", "reduce-exec", "build", "newobj", "global"])
def test_load_checkpoint_refuses_code(tmp_path: Path, kind: str, protocol: int) -> None:
    marker = tmp_path / "marker"
    path = _evil_checkpoint(tmp_path / "step_00000002.pt", marker, kind, protocol)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    # protocol 2: the global is named; protocol 4: torch's reader stops at the first FRAME, before it
    assert "refused to load" in message if protocol == 2 else "not a readable checkpoint" in message
    assert not marker.exists()


def test_plain_pickle_and_legacy_files_are_not_checkpoints(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"format": "timmface", "x": Reduce(marker)}, protocol=2))
    legacy = tmp_path / "legacy.pt"
    torch.save({"format": "timmface", "x": Reduce(marker)}, legacy, _use_new_zipfile_serialization=False)
    for path in (plain, legacy):
        with pytest.raises(CheckpointError, match="not a torch.save zip file"):
            load_checkpoint(path)
    assert not marker.exists()


def test_resume_refuses_a_malicious_checkpoint(toy_data: Path, tmp_path: Path, capsys) -> None:
    """``resume=auto`` does not skip a checkpoint that asks for code (it would then train over the run) and an
    explicit ``resume=FILE`` stops the same way: exit 2, one line naming the file, nothing run."""
    run, marker = tmp_path / "run", tmp_path / "marker"
    assert main(["train", *tiny_run_args(toy_data, run, "total_steps=2", "eval_every=0")]) == 0
    good = load_checkpoint(checkpoint_path(run, 2))["model"]
    evil = _evil_checkpoint(checkpoint_path(run, 4), marker)
    capsys.readouterr()
    for resume in ("resume=auto", f"resume={evil}"):
        code = main(["train", *tiny_run_args(toy_data, run, "total_steps=6", "eval_every=0"), resume])
        line = _one_line(capsys.readouterr().err)
        assert code == 2 and str(evil) in line and "refused to load" in line and "posix.system" in line, line
    assert not marker.exists()
    after = load_checkpoint(checkpoint_path(run, 2))["model"]  # the run's own checkpoint is untouched
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_resume_auto_with_only_unreadable_checkpoints_stops(toy_data: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    path = checkpoint_path(run, 5)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 not really a checkpoint")
    code = main(["train", *tiny_run_args(toy_data, run, "total_steps=6"), "resume=auto"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "none of its 1 checkpoints can be read" in line and "overwrite=true" in line
    assert path.exists()  # not pruned by a fresh start


@pytest.fixture()
def evil_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run directory whose newest checkpoint carries a payload (the older one is real)."""
    run = fake_run(tmp_path / "run", step=3)
    marker = tmp_path / "marker"
    _evil_checkpoint(checkpoint_path(run, 9), marker)
    return run, marker


def test_eval_model_refuses_code(evil_run: tuple[Path, Path], toy_data: Path, tmp_path: Path, capsys) -> None:
    run, marker = evil_run
    loose = _evil_checkpoint(tmp_path / "weights.pt", marker)  # a file: tried as a checkpoint, then as a teacher
    for spec in (run, checkpoint_path(run, 9), loose):
        assert main(["eval", "--model", str(spec), "--bins", str(toy_data / "toy_val.bin")]) == 2
        line = _one_line(capsys.readouterr().err)
        assert "refused to" in line and "could run code" in line, line
    assert not marker.exists()


def test_export_and_merge_refuse_code(evil_run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    run, marker = evil_run
    out = tmp_path / "hub"
    assert main(["export", str(run), "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(checkpoint_path(run, 9)) in line and "refused to load" in line
    assert not out.exists()
    for source in (run, checkpoint_path(run, 9)):
        assert main(["ckpt", "merge", str(source), "--out", str(tmp_path / "m.pt")]) == 2
        assert "refused to load" in _one_line(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "m.pt").exists()


# --------------------------------------------------------------------------------------------------
# Teachers: AdaFace Lightning .ckpt with AttributeDict / argparse.Namespace, loaded through stand-ins
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_lightning(tmp_path: Path) -> Any:
    """Modules named like Lightning's, registered only during the test, whose classes write a marker if
    anything ever builds them: a loader that resolved the pickled names to them would be caught."""
    marker = tmp_path / "lightning_code_ran"

    class AttributeDict(dict):
        def __setitem__(self, key: Any, value: Any) -> None:
            _touch(str(marker))
            super().__setitem__(key, value)

        def __setstate__(self, state: Any) -> None:
            _touch(str(marker))

    names = ["pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    AttributeDict.__module__, AttributeDict.__qualname__ = "pytorch_lightning.utilities.parsing", "AttributeDict"
    sys.modules["pytorch_lightning.utilities.parsing"].AttributeDict = AttributeDict  # type: ignore[attr-defined]
    try:
        yield types.SimpleNamespace(AttributeDict=AttributeDict, marker=marker)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _adaface_ir18_state() -> dict[str, torch.Tensor]:
    from tests.test_teachers import ADAFACE, adaface_shapes

    return {f"model.{k}": torch.zeros(shape) for k, shape in adaface_shapes(ADAFACE["ir_18"]).items()}


def test_adaface_lightning_ckpt_with_hyper_parameters_loads_safely(fake_lightning: Any, tmp_path: Path) -> None:
    import teachers
    from teachers.files import ArgparseNamespace, safe_torch_load

    args = argparse.Namespace(arch="ir_18", lr=0.1, head="adaface")
    hparams = fake_lightning.AttributeDict(arch="ir_18", m=0.4, h=0.333)
    dict.__setitem__(hparams, "args", args)  # (AttributeDict.__setitem__ would write the marker while building)
    ckpt = {"epoch": 25, "global_step": 1000, "pytorch-lightning_version": "1.8.6", "state_dict": _adaface_ir18_state(),
            "hyper_parameters": hparams, "hparams_name": "kwargs"}  # fmt: skip
    path = tmp_path / "adaface_ir18_webface4m.ckpt"
    torch.save(ckpt, path)
    data = path.read_bytes()
    assert b"pytorch_lightning.utilities.parsing" in data and b"argparse" in data and b"Namespace" in data
    assert not fake_lightning.marker.exists()

    loaded = safe_torch_load(path)
    hp = loaded["hyper_parameters"]
    assert type(hp) is dict and hp["arch"] == "ir_18" and hp["m"] == 0.4
    assert isinstance(hp["args"], ArgparseNamespace) and hp["args"].lr == 0.1 and "arch='ir_18'" in repr(hp["args"])
    teacher = teachers.load_teacher(path)
    assert (
        teacher.teacher_info["architecture"] == "ir_18" and "Lightning checkpoint" in teacher.teacher_info["container"]
    )
    assert not fake_lightning.marker.exists()
    # the stand-ins are in force only while a teacher loads: plain torch.load still refuses the names
    with pytest.raises(pickle.UnpicklingError, match="AttributeDict"):
        torch.load(path, weights_only=True)


def _lightning_hook(marker: str) -> None:
    _touch(marker)


class _CallsLightning:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (_lightning_hook, (self.marker,))


def test_other_lightning_names_are_still_refused(fake_lightning: Any, tmp_path: Path) -> None:
    """Only the two container names are mapped: any other global from the same module is refused."""
    import teachers

    marker = tmp_path / "marker"
    _lightning_hook.__module__ = "pytorch_lightning.utilities.parsing"
    sys.modules["pytorch_lightning.utilities.parsing"]._lightning_hook = _lightning_hook  # type: ignore[attr-defined]
    try:
        path = tmp_path / "evil.ckpt"
        torch.save({"state_dict": _adaface_ir18_state(), "hyper_parameters": _CallsLightning(marker)}, path)
    finally:
        _lightning_hook.__module__ = __name__
    assert b"_lightning_hook" in path.read_bytes()
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher(path)
    message = str(e.value)
    assert "refused to unpickle" in message and "pytorch_lightning.utilities.parsing._lightning_hook" in message
    assert "\n" not in message and not marker.exists()


# --------------------------------------------------------------------------------------------------
# .bin verification files: every way a pickle can reach code, at every protocol
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["reduce-system", "reduce-exec", "reduce-open", "build", "newobj", "global"])
def test_bin_refuses_code(tmp_path: Path, kind: str, protocol: int) -> None:
    from timmface.data.bin import read_bin

    marker = tmp_path / "marker"
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([payload(kind, marker), b"x"], [True]), protocol=protocol))
    with pytest.raises(DataError) as e:
        read_bin(path)
    message = str(e.value)
    assert message.startswith(f"{path}: refused to unpickle ") and "\n" not in message
    assert not marker.exists()


def test_bin_numpy_arrays_cannot_smuggle_objects(tmp_path: Path) -> None:
    """numpy's reconstructors are allowed for uint8/bool arrays only: an object array holding a payload is refused."""
    from timmface.data.bin import read_bin

    marker = tmp_path / "marker"
    path = tmp_path / "o.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], np.array([Reduce(marker)], dtype=object)), protocol=2))
    with pytest.raises(DataError, match="refused to unpickle"):
        read_bin(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Configs: YAML tags, overrides, augmentations
# --------------------------------------------------------------------------------------------------

_TAGS = [
    "!!python/object/apply:os.system ['touch {m}']",
    "!!python/object/new:os.system ['touch {m}']",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/object:tests.test_security.Build {{marker: {m}}}",
]


@pytest.mark.parametrize("tag", _TAGS)
def test_yaml_python_tags_are_refused(tmp_path: Path, tag: str, capsys) -> None:
    from timmface.config import load_config

    marker = tmp_path / "marker"
    text = f"output_dir: {tag.format(m=marker)}\n"
    if "apply" in tag:  # the premise: the unsafe loader would run it
        yaml.unsafe_load(text)
        assert marker.exists()
        marker.unlink()
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: not valid YAML at line 1") and "\n" not in message
    assert "python/" in message  # PyYAML's reason names the refused tag
    based = tmp_path / "child.yaml"  # through a 'base:' chain too
    based.write_text("base: evil.yaml\n")
    with pytest.raises(ConfigError, match="evil.yaml: not valid YAML"):
        load_config(based)
    assert main(["train", "--config", str(path)]) == 2
    assert "evil.yaml: not valid YAML" in _one_line(capsys.readouterr().err)
    assert not marker.exists()


def test_override_values_are_data(tmp_path: Path) -> None:
    from timmface.config import load_config

    marker = tmp_path / "marker"
    for text in (f"output_dir=__import__('os').system('touch {marker}')", f"output_dir=$(touch {marker})"):
        assert load_config(None, [text]).output_dir == text.split("=", 1)[1]
    with pytest.raises(ConfigError, match="value is not valid YAML"):
        load_config(None, [f"output_dir=!!python/object/apply:os.system ['touch {marker}']"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, [f"__class__.__init__.__globals__=touch {marker}"])
    assert not marker.exists()


def test_augmentations_come_from_the_allow_list_only(tmp_path: Path) -> None:
    from timmface.data.transforms import build_transform

    marker = tmp_path / "marker"
    for name in ("os.system", "system", "__import__", "eval", "torchvision.transforms.v2.Lambda", "Lambda"):
        with pytest.raises(ConfigError, match="not in the allow-list"):
            build_transform([{"name": name, "args": [f"touch {marker}"]}])
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Paths: what a run, an export and the caches write stays where it was told
# --------------------------------------------------------------------------------------------------


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_run_files_stay_inside_output_dir(toy_data: Path, tmp_path: Path) -> None:
    """An output_dir that does not exist yet, with odd characters, and a verification set with an odd name:
    every file the run writes is inside output_dir, nothing is interpreted by a shell."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    os.replace(data / "toy_val.bin", data / "v; $(touch pwned) ..%2f.bin")
    run = tmp_path / "runs" / "a b;$(touch pwned2)" / "--x ü"
    before = _files(tmp_path)
    assert main(["train", *tiny_run_args(data, run, "total_steps=3")]) == 0
    new = _files(tmp_path) - before
    outside = [p for p in new if not p.resolve().is_relative_to(run.resolve()) and p.parent != data]
    assert not outside, outside
    assert {"config.yaml", "metrics.jsonl"} <= {p.name for p in new}
    assert [s for s, _ in list_checkpoints(run)] == [3]
    assert not list(tmp_path.rglob("pwned*"))


def test_export_never_deletes_the_run(tmp_path: Path, capsys) -> None:
    run = fake_run(tmp_path / "run", step=3)
    (run / "keep.txt").write_text("mine")
    for out in (run, run / "checkpoints", tmp_path):
        assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2
        assert "lives inside it" in _one_line(capsys.readouterr().err)
    link = tmp_path / "link"
    link.symlink_to(run)
    assert main(["export", str(run), "--out", str(link), "--overwrite"]) == 2
    assert "lives inside it" in _one_line(capsys.readouterr().err)
    assert (run / "keep.txt").read_text() == "mine" and list_checkpoints(run)


def test_cache_files_stay_beside_their_target(tmp_path: Path) -> None:
    """Temporary names are derived inside the target's own folder; fallback and demo cache folders are hashes."""
    from timmface.data.demo import demo_key
    from timmface.data.recordio import index_cache_path
    from timmface.embedding.cache import create_file

    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    target = inner / ".." / "emb.tfemb"  # a '..' in the path given: the file lands where that path points
    create_file(target, {}, num_records=2, dim=4, views=["original"], dtype="float16")
    assert _files(tmp_path) == {tmp_path / "a" / "emb.tfemb"}

    idx = tmp_path / "d" / "train.idx"
    path = index_cache_path(idx, cache_dir=tmp_path / "cache")
    assert path.parent == tmp_path / "cache" and set(path.stem) <= set("0123456789abcdef")

    key = demo_key(num_identities=5, images_per_identity=2)
    assert set(key) <= set("0123456789abcdef") and len(key) == 16
    assert key == demo_key(num_identities=5, images_per_identity=2)


def test_ckpt_merge_refuses_to_overwrite_its_sources(tmp_path: Path, capsys) -> None:
    run = fake_run(tmp_path / "run", step=3)
    ckpt = checkpoint_path(run, 3)
    before = ckpt.read_bytes()
    assert main(["ckpt", "merge", str(ckpt), "--out", str(ckpt)]) == 2
    assert "would overwrite" in _one_line(capsys.readouterr().err)
    assert ckpt.read_bytes() == before


def test_no_unsafe_loading_anywhere_in_the_code() -> None:
    """Every torch.load passes weights_only=True; no pickle.load(s), yaml.load, eval or exec on user data."""
    import re

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*root.glob("timmface/**/*.py"), *root.glob("teachers/**/*.py"), *root.glob("students/**/*.py")]:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{path.name}: {m.group(0)}")
        for pattern in (r"pickle\.loads?\(", r"yaml\.(unsafe_)?load\(", r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders
