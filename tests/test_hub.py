"""Hub ids (``hf-hub:`` models, ``hf://`` dataset files) resolved through huggingface_hub's cache, offline.

Repositories live on a fake server and in a real-layout hub cache (``tests/fake_hub.py``); offline tests run the
real huggingface_hub against that cache with ``HF_HUB_OFFLINE=1``. Server answers (missing repository, gated
repository, ...) are huggingface_hub's own exception classes raised by the replaced network calls. Sockets are
blocked throughout: a call that would leave the machine fails the test.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import timm
import torch

import students
import teachers
from tests.fake_hub import FakeHub, use_fake_cache
from tests.test_teachers import assert_one_line, rgb_batch
from tests.test_teachers_timm import EMBED, student, timmface_checkpoint
from timmface import hub
from timmface.errors import ConfigError, DataError, TeacherError

REPO = "faces/tiny-resnet.cosface"
COLD = "not in the local cache and HF_HUB_OFFLINE is set"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    return use_fake_cache(tmp_path / "hf-cache", monkeypatch)


def timm_folder_files(model: torch.nn.Module, tmp: Path, **model_args: object) -> dict[str, Path]:
    """``config.json`` + ``model.safetensors`` as ``timm.models.save_for_hf`` writes them (what timm-face published)."""
    folder = tmp / f"save{len(list(tmp.glob('save*')))}"
    args = {"num_classes": EMBED, **model_args}
    timm.models.save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    return {p.name: p for p in folder.iterdir()}


def checkpoint_bytes(model: torch.nn.Module, step: int = 5) -> bytes:
    buf = io.BytesIO()
    torch.save(timmface_checkpoint(model, None, step, "test_resnet", {}), buf)
    return buf.getvalue()


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = rgb_batch(2, size=112)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ the fake cache


def test_fake_cache_is_laid_out_as_huggingface_hub_lays_it_out(fake: FakeHub) -> None:
    """The library's own cache scanner and cache lookup read what the fake writes."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    commit = fake.commit(REPO, {"config.json": b"{}", "sub/model.safetensors": b"w" * 10})
    data_commit = fake.commit("faces/eval", {"lfw.bin": b"pairs"}, repo_type="dataset")
    info = scan_cache_dir(fake.cache)
    assert not info.warnings
    repos = {(r.repo_type, r.repo_id): r for r in info.repos}
    (revision,) = repos[("model", REPO)].revisions
    assert revision.commit_hash == commit and revision.refs == frozenset({"main"})
    assert sorted(f.file_name for f in revision.files) == ["config.json", "model.safetensors"]
    assert next(iter(repos[("dataset", "faces/eval")].revisions)).commit_hash == data_commit
    cached = try_to_load_from_cache(REPO, "sub/model.safetensors", cache_dir=fake.cache)
    assert Path(cached).read_bytes() == b"w" * 10 and f"snapshots/{commit}/sub/" in cached


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("spec", "repo_id", "repo_type", "revision", "path"),
    [
        ("hf-hub:gaunernst/vit_tiny_patch8_112.cosface_ms1mv3", "gaunernst/vit_tiny_patch8_112.cosface_ms1mv3",
         "model", None, ""),
        ("hf-hub:o/r@v1.0", "o/r", "model", "v1.0", ""),
        ("hf-hub:o/r@" + "a" * 40 + "/models/w600k_r50.onnx", "o/r", "model", "a" * 40, "models/w600k_r50.onnx"),
        ("hf-hub:o/r@refs/pr/3/backbone.pth", "o/r", "model", "refs/pr/3", "backbone.pth"),
        ("hf-hub:o/r@refs%2Fpr%2F3", "o/r", "model", "refs/pr/3", ""),
        ("hf://gaunernst/face-eval/lfw.bin", "gaunernst/face-eval", "dataset", None, "lfw.bin"),
        ("hf://datasets/o/face-eval@main/bins/lfw.bin", "o/face-eval", "dataset", "main", "bins/lfw.bin"),
    ],
)  # fmt: skip
def test_parse(spec: str, repo_id: str, repo_type: str, revision: str | None, path: str) -> None:
    ref = hub.parse(spec)
    assert (ref.repo_id, ref.repo_type, ref.revision, ref.path) == (repo_id, repo_type, revision, path)
    assert hub.parse(ref.spec()) == ref  # spelled back, parsed again: the same reference


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf-hub:justone", "hf-hub:OWNER/REPO[@REVISION][/FILE]"),
        ("hf-hub:o/r/x@v1", "hf-hub:OWNER/REPO[@REVISION][/FILE]"),
        ("hf-hub:o/r/../../etc/passwd", "'..' are not allowed"),
        ("hf://o/r", "name a file of the dataset repository"),
        ("hf-hub:-o/r", "hf-hub:OWNER/REPO"),
    ],
)
def test_malformed_specs_are_one_line(spec: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        hub.parse(spec)
    assert expected in assert_one_line(e) and assert_one_line(e).startswith(spec)


def test_models_and_data_files_are_not_confused(fake: FakeHub) -> None:
    with pytest.raises(ConfigError, match="a model is hf-hub:OWNER/REPO"):
        teachers.load_teacher("hf://o/r/lfw.bin")
    with pytest.raises(ConfigError, match="a file of a dataset is hf://"):
        hub.data_file("hf-hub:o/r/lfw.bin")


# ------------------------------------------------------------------------------------------------ offline loading


def test_timm_repo_loads_offline_like_the_local_folder(fake: FakeHub, tmp_path: Path) -> None:
    model = student(0)
    files = timm_folder_files(model, tmp_path)
    commit = fake.commit(REPO, {**files, "README.md": b"# card", "model.onnx": b"\x08\x07"})
    local = teachers.load_teacher(files["config.json"].parent)
    for spec in (f"hf-hub:{REPO}", f"hf-hub:{REPO}@main", f"hf-hub:{REPO}@{commit}"):
        t = teachers.load_teacher(spec)
        same_outputs(t, local)
        same_outputs(t, model)
        info = t.teacher_info
        assert info["format"] == "timm_hub" and info["architecture"] == "test_resnet"
        assert info["source"] == f"hf-hub:{REPO}@{commit}/model.safetensors"
        assert info["hub"] == {
            "spec": info["source"], "repo_id": REPO, "repo_type": "model",
            "revision": spec.partition("@")[2] or "main", "commit": commit,
            "files": ["config.json", "model.safetensors"],
        }  # fmt: skip
    # the pinned spec loads the same bytes again; the fingerprint is the local copy's (contents only)
    same_outputs(teachers.load_teacher(info["source"]), model)
    assert teachers.teacher_fingerprint(f"hf-hub:{REPO}") == teachers.teacher_fingerprint(files["config.json"].parent)
    assert [p.name for p in teachers.teacher_files(f"hf-hub:{REPO}")] == ["config.json", "model.safetensors"]


def test_revisions_pick_their_own_weights(fake: FakeHub, tmp_path: Path) -> None:
    old, new = student(1), student(2)
    first = fake.commit(REPO, timm_folder_files(old, tmp_path))
    fake.commit(REPO, timm_folder_files(old, tmp_path), branch="v1")
    second = fake.commit(REPO, timm_folder_files(new, tmp_path))
    assert first != second
    same_outputs(teachers.load_teacher(f"hf-hub:{REPO}"), new)  # main moved on
    same_outputs(teachers.load_teacher(f"hf-hub:{REPO}@{first}"), old)
    same_outputs(teachers.load_teacher(f"hf-hub:{REPO}@v1"), old)
    assert hub.pin(f"hf-hub:{REPO}@v1").startswith(f"hf-hub:{REPO}@{first}/")
    fp = {teachers.teacher_fingerprint(f"hf-hub:{REPO}@{c}") for c in (first, second)}
    assert len(fp) == 2  # different weights, different fingerprints; the same commit, the same one (above)


def test_single_file_repo_and_picking_one_of_several(fake: FakeHub) -> None:
    a, b = student(3), student(4)
    commit = fake.commit("faces/one", {"ckpt/teacher.pt": checkpoint_bytes(a), "README.md": b"x"})
    t = teachers.load_teacher("hf-hub:faces/one")
    same_outputs(t, a)
    assert t.teacher_info["format"] == "timmface_checkpoint"
    assert t.teacher_info["source"] == f"hf-hub:faces/one@{commit}/ckpt/teacher.pt"

    fake.commit("faces/many", {"a.pt": checkpoint_bytes(a), "b.pt": checkpoint_bytes(b), "det_10g.onnx": b"\x08\x07"})
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher("hf-hub:faces/many")
    message = assert_one_line(e)
    assert "3 candidate weight files (a.pt, b.pt, det_10g.onnx)" in message
    assert "pick one with hf-hub:OWNER/REPO/FILE, e.g. hf-hub:faces/many/a.pt" in message
    same_outputs(teachers.load_teacher("hf-hub:faces/many/b.pt"), b)


def test_explicit_weights_file_of_a_timm_folder_is_the_folder(fake: FakeHub, tmp_path: Path) -> None:
    model = student(5)
    files = timm_folder_files(model, tmp_path)
    commit = fake.commit(REPO, {f"sub/{k}": v for k, v in files.items()})
    t = teachers.load_teacher(f"hf-hub:{REPO}/sub/model.safetensors")
    same_outputs(t, model)
    assert t.teacher_info["source"] == f"hf-hub:{REPO}@{commit}/sub/model.safetensors"
    same_outputs(teachers.load_teacher(f"hf-hub:{REPO}/sub"), model)  # a folder inside the repository


def test_errors_inside_the_files_name_the_hub_path(fake: FakeHub) -> None:
    commit = fake.commit("faces/junk", {"backbone.pth": b"\x80\x02not really a pickle"})
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher("hf-hub:faces/junk")
    message = assert_one_line(e)
    assert message.startswith(f"hf-hub:faces/junk@{commit}/backbone.pth: ") and str(fake.cache) not in message


# ------------------------------------------------------------------------------------------------ offline errors


def test_cold_cache_offline_is_one_line(fake: FakeHub, tmp_path: Path) -> None:
    for spec in (f"hf-hub:{REPO}", f"hf-hub:{REPO}@v2", f"hf-hub:{REPO}/backbone.pth"):
        with pytest.raises(TeacherError) as e:
            teachers.load_teacher(spec)
        message = assert_one_line(e)
        assert message.startswith(f"{spec}: {COLD}: run once with network access") and str(fake.cache) in message
    with pytest.raises(DataError) as e:
        hub.data_file("hf://faces/eval/lfw.bin")
    assert assert_one_line(e).startswith(f"hf://faces/eval/lfw.bin: {COLD}")

    # warm repository, but the asked-for file was never downloaded: it may exist on the Hub
    fake.commit(REPO, timm_folder_files(student(0), tmp_path))
    with pytest.raises(TeacherError, match=f"hf-hub:{REPO}/other.pth: {COLD}"):
        teachers.load_teacher(f"hf-hub:{REPO}/other.pth")
    # a partial cache without weights is a cold cache too, not "no weights": the Hub may hold them
    fake.commit("faces/card", {"README.md": b"x", "model.safetensors": b"w"}, cached=False)
    fake.download("faces/card", "README.md", revision="main")
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher("hf-hub:faces/card")
    assert COLD in assert_one_line(e) and "(cached: README.md)" in assert_one_line(e)


# ------------------------------------------------------------------------------------------------ online (fake server)


def test_first_use_downloads_only_the_chosen_files_then_works_offline(
    fake: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = student(6)
    files = timm_folder_files(model, tmp_path)
    commit = fake.commit(REPO, {**files, "model.onnx": b"\x08\x07", "pytorch_model.bin": b"old"}, cached=False)
    fake.online(monkeypatch)
    same_outputs(teachers.load_teacher(f"hf-hub:{REPO}"), model)
    downloaded = sorted(c[2] for c in fake.calls if c[0] == "download")
    assert downloaded == ["config.json", "model.safetensors"]  # not the ONNX, not the other weights
    assert (fake.storage(REPO) / "refs" / "main").read_text() == commit

    fake.offline(monkeypatch)  # a new process, HF_HUB_OFFLINE=1: the cache is enough
    same_outputs(teachers.load_teacher(f"hf-hub:{REPO}"), model)


def test_pinned_resolutions_are_remembered(fake: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = fake.commit(REPO, timm_folder_files(student(7), tmp_path), cached=False)
    fake.online(monkeypatch)
    pinned = hub.pin(f"hf-hub:{REPO}")
    assert pinned == f"hf-hub:{REPO}@{commit}/model.safetensors"
    fake.calls.clear()
    assert hub.pin(pinned) == pinned and teachers.teacher_files(pinned)
    assert fake.calls == []  # a commit's files never change: no second listing or download
    hub.pin(f"hf-hub:{REPO}")
    assert fake.calls[0] == ("repo_info", REPO, None)  # a branch may move: asked again


def test_server_errors_are_one_line(fake: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.commit(REPO, timm_folder_files(student(0), tmp_path), cached=False)
    fake.commit("faces/gated", {"backbone.pth": b"w"}, cached=False)
    fake.gated.add("faces/gated")
    fake.commit("faces/docs", {"README.md": b"x", "notes.txt": b"y", "model.h5": b"z"}, cached=False)
    fake.commit("faces/eval", {"lfw.bin": b"x"}, repo_type="dataset", cached=False)
    fake.online(monkeypatch)
    cases = [
        ("hf-hub:nobody/nothing", TeacherError, "no model repository 'nobody/nothing' on the Hub (if it is private: "
         "set HF_TOKEN"),
        (f"hf-hub:{REPO}@v9", TeacherError, f"repository '{REPO}' has no revision 'v9'"),
        (f"hf-hub:{REPO}/missing.pth", TeacherError, f"no file or folder 'missing.pth' in {REPO} at "),
        ("hf-hub:faces/gated", TeacherError, "gated repository: accept its conditions at https://huggingface.co/"
         "faces/gated (logged in), then set HF_TOKEN"),
        ("hf-hub:faces/docs", TeacherError, "no recognisable weights in hf-hub:faces/docs@"),
        ("hf://faces/eval/cfp_fp.bin", DataError, "no file 'cfp_fp.bin' in faces/eval at revision main"),
        ("hf://faces/nothing/lfw.bin", DataError, "no dataset repository 'faces/nothing' on the Hub"),
        ("hf://faces/eval@v3/lfw.bin", DataError, "repository 'faces/eval' has no revision 'v3'"),
    ]  # fmt: skip
    for spec, cls, expected in cases:
        with pytest.raises(cls) as e:
            teachers.load_teacher(spec) if spec.startswith("hf-hub:") else hub.data_file(spec)
        message = assert_one_line(e)
        assert message.startswith(f"{spec}: ") and expected in message, message
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher("hf-hub:faces/docs")
    assert "it holds README.md, model.h5, notes.txt" in str(e.value)


def test_unreachable_hub_falls_back_to_the_cache(
    fake: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    model = student(8)
    fake.commit(REPO, timm_folder_files(model, tmp_path))
    fake.online(monkeypatch)

    def down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", down)
    same_outputs(teachers.load_teacher(f"hf-hub:{REPO}"), model)  # huggingface_hub's downloads do the same
    with pytest.raises(TeacherError) as e:
        teachers.load_teacher("hf-hub:faces/uncached")
    message = assert_one_line(e)
    assert "cannot reach the Hub (ConnectionError: Connection refused) and it is not in the local cache" in message
    assert "HF_HUB_OFFLINE" not in message


# ------------------------------------------------------------------------------------------------ dataset files


def test_dataset_files_resolve_offline_with_their_commit(fake: FakeHub) -> None:
    commit = fake.commit("faces/eval", {"lfw.bin": b"pairs", "bins/cfp_fp.bin": b"more"}, repo_type="dataset")
    for spec in ("hf://faces/eval/lfw.bin", "hf://datasets/faces/eval/lfw.bin", f"hf://faces/eval@{commit}/lfw.bin"):
        path, resolved = hub.data_file(spec)
        assert path.read_bytes() == b"pairs" and resolved is not None and resolved.commit == commit
        assert resolved.pinned == f"hf://faces/eval@{commit}/lfw.bin"
    path, resolved = hub.data_file("hf://faces/eval/bins/cfp_fp.bin")
    assert path.name == "cfp_fp.bin" and resolved.record()["files"] == ["bins/cfp_fp.bin"]
    assert hub.data_file("local/lfw.bin") == (Path("local/lfw.bin"), None)


# ------------------------------------------------------------------------------------------------ push round trip


def test_export_push_to_hub_loads_back_in_timmface_and_plain_timm(
    fake: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """What ``timmface export --push-to-hub`` uploads is a new commit; timmface and plain timm load it back."""
    from tests.test_eval_cli import backbone_of, fake_run
    from timmface.cli import main

    run = fake_run(tmp_path / "run")
    fake.online(monkeypatch)
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--push-to-hub", "me/face-vit"]) == 0
    commit = fake.repos[("model", "me/face-vit")]["refs"]["main"]
    assert f"this upload: hf-hub:me/face-vit@{commit}" in capsys.readouterr().out
    backbone = backbone_of(run).eval()

    t = teachers.load_teacher("hf-hub:me/face-vit")  # first use: downloads into the cache
    assert t.teacher_info["hub"]["commit"] == commit
    fake.offline(monkeypatch)
    for loaded in (
        teachers.load_teacher("hf-hub:me/face-vit"),
        timm.create_model("hf-hub:me/face-vit", pretrained=True).eval(),  # plain timm, through the same cache
        timm.create_model(f"hf-hub:me/face-vit@{commit}", pretrained=True).eval(),
    ):
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # the run's img_size
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), backbone(x), rtol=1e-5, atol=1e-5)
    assert students  # face_* variants need it imported before plain timm can build them


# ------------------------------------------------------------------------------------------------ entry points (CLI)


@pytest.fixture
def warm(fake: FakeHub, tmp_path: Path, toy_data: Path) -> dict[str, object]:
    """A warm cache: a timm teacher repository (a ViT at the toy data's 32 x 32) and a dataset repository
    holding a ``.bin`` set."""
    files = timm_folder_files(student(0, "test_vit", img_size=32), tmp_path, img_size=32)
    commit = fake.commit(REPO, {**files, "README.md": b"# card"})
    data_commit = fake.commit("faces/eval", {"toy_val.bin": toy_data / "toy_val.bin"}, repo_type="dataset")
    folder = files["config.json"].parent
    return {"commit": commit, "data_commit": data_commit, "folder": folder, "fingerprint": _fp(folder)}


def _fp(path: Path | str) -> str:
    return teachers.teacher_fingerprint(path)


def test_eval_records_the_commits_of_model_and_sets(
    warm: dict, toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from timmface.cli import main
    from timmface.evaluation.verification import evaluate_bin

    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", f"hf-hub:{REPO}", "--bins", "hf://faces/eval/toy_val.bin"]) == 0
    res = json.loads((tmp_path / "faces--tiny-resnet.cosface.eval.json").read_text())  # not into the cache
    hub_info = res["model_info"]["hub"]
    assert hub_info["commit"] == warm["commit"] and hub_info["files"] == ["config.json", "model.safetensors"]
    assert res["model_info"]["source"] == f"hf-hub:{REPO}@{warm['commit']}/model.safetensors"
    assert res["fingerprint"] == warm["fingerprint"]
    entry = res["bins"]["toy_val"]
    assert entry["path"] == f"hf://faces/eval@{warm['data_commit']}/toy_val.bin"
    assert entry["hub"]["commit"] == warm["data_commit"] and entry["hub"]["files"] == ["toy_val.bin"]
    expected = evaluate_bin(teachers.load_teacher(warm["folder"]), toy_data / "toy_val.bin")
    assert entry["accuracy"] == expected.accuracy and entry["threshold"] == expected.threshold


def test_teachers_inspect_shows_the_commit_and_errors_are_one_line(
    warm: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from timmface.cli import main

    monkeypatch.setenv("COLUMNS", "400")  # rich wraps the table to the terminal: keep each value on its row
    assert main(["teachers", "inspect", f"hf-hub:{REPO}@main"]) == 0
    out = capsys.readouterr().out
    assert f"commit {warm['commit']}" in out and "config.json, model.safetensors" in out
    assert warm["fingerprint"] in out
    assert main(["teachers", "inspect", "hf-hub:faces/absent"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("timmface teachers")
    assert f": error: hf-hub:faces/absent: {COLD}: run once with network access" in err


def test_embed_outputs_name_the_pinned_model(warm: dict, toy_data: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from timmface.cli import main
    from timmface.embedding.cache import EmbeddingCache
    from timmface.embedding.files import read_embeddings

    pinned = f"hf-hub:{REPO}@{warm['commit']}/model.safetensors"
    args = ["--data", str(toy_data), "--workers", "0", "--no-progress"]
    assert main(["embed", "--model", f"hf-hub:{REPO}", "--out", str(tmp_path / "hub.safetensors"), *args]) == 0
    assert main(["embed", "--model", str(warm["folder"]), "--out", str(tmp_path / "local.safetensors"), *args]) == 0
    with safe_open(str(tmp_path / "hub.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["model"] == pinned and meta["model_fingerprint"] == warm["fingerprint"]
    from_hub, from_folder = (read_embeddings(tmp_path / f"{name}.safetensors")[1] for name in ("hub", "local"))
    assert (from_hub == from_folder).all()

    assert main(["embed", "--model", f"hf-hub:{REPO}", "--cache", "--out", str(tmp_path / "t.tfemb"), *args]) == 0
    with EmbeddingCache.open(tmp_path / "t.tfemb") as cache:
        # the same fingerprint as the local copy: a cache built from the Hub serves a run using the folder
        assert cache.teacher_fingerprint == warm["fingerprint"] and cache.meta["teacher"]["path"] == pinned


@pytest.mark.slow
def test_distill_records_pinned_ids_and_a_resume_keeps_them(
    warm: dict, fake: FakeHub, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    import yaml

    from tests.conftest import tiny_run_args
    from timmface.cli import main
    from timmface.metrics import read_metrics

    out = tmp_path / "run"
    args = tiny_run_args(toy_data, out, "data.val_sets=[hf://faces/eval/toy_val.bin]", "total_steps=3")
    assert main(["distill", "--teacher", f"hf-hub:{REPO}", *args]) == 0
    pinned = f"hf-hub:{REPO}@{warm['commit']}/model.safetensors"
    pinned_bin = f"hf://faces/eval@{warm['data_commit']}/toy_val.bin"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["distill"]["teacher"] == pinned and saved["data"]["val_sets"] == [pinned_bin]
    assert f"hf-hub:{REPO} -> {pinned}" in capsys.readouterr().out
    assert any("acc/toy_val" in r for r in read_metrics(out))  # the Hub set was evaluated

    # main moves on; resuming the run with the same command keeps the teacher it started with
    new = fake.commit(REPO, timm_folder_files(student(9, "test_vit", img_size=32), tmp_path, img_size=32))
    assert new != warm["commit"]
    assert main(["distill", "--teacher", f"hf-hub:{REPO}", *args, "total_steps=6", "resume=auto"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["distill"]["teacher"] == pinned
    printed = capsys.readouterr().out
    assert f"hf-hub:{REPO} -> {pinned}" in printed and "distill.teacher" not in printed  # not a changed setting
    ckpt = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["distill"]["teacher"] == pinned

    # eval of the run, without --bins: its own (pinned) Hub set, offline from the cache
    assert main(["eval", "--model", str(out), "--json", str(tmp_path / "e.json")]) == 0
    entry = json.loads((tmp_path / "e.json").read_text())["bins"]["toy_val"]
    assert entry["path"] == pinned_bin and entry["hub"]["commit"] == warm["data_commit"]


def test_a_resume_keeps_the_recorded_commit_of_the_same_source() -> None:
    sha, other = "a" * 40, "b" * 40
    recorded = [f"hf-hub:o/r@{sha}/sub/model.safetensors", f"hf://o/eval@{other}/lfw.bin"]
    assert hub.resumed_pin("hf-hub:o/r", recorded) == recorded[0]
    assert hub.resumed_pin("hf-hub:o/r@main/sub", recorded) == recorded[0]
    assert hub.resumed_pin("hf-hub:o/r/other.pth", recorded) is None  # another file: resolve afresh
    assert hub.resumed_pin(f"hf-hub:o/r@{other}", recorded) is None  # a commit asked for explicitly wins
    assert hub.resumed_pin("hf-hub:o/r2", recorded) is None and hub.resumed_pin("local/x.pth", recorded) is None
    assert hub.resumed_pin("hf://o/eval/lfw.bin", recorded) == recorded[1]
    assert hub.resumed_pin("hf://o/eval/cfp_fp.bin", recorded) is None


def _pins_on_each_rank(rank: int, world: int, arg_sets: list[list[str]]) -> list[dict[str, object]]:
    from timmface.config import load_config
    from timmface.errors import TimmfaceError
    from timmface.trainer import Trainer

    out: list[dict[str, object]] = []
    for args in arg_sets:
        try:
            trainer = Trainer(load_config(None, args))
        except TimmfaceError as e:
            out.append({"error": str(e)})
            continue
        out.append({"val_sets": list(trainer.cfg.data.val_sets), "local": [str(p) for p in trainer.val_sets]})
    return out


@pytest.mark.multiprocess
def test_rank_zero_pins_for_every_rank(warm: dict, toy_data: Path, tmp_path: Path) -> None:
    """Rank 0 resolves (and downloads); every rank gets its pinned ids, or the same one-line error."""
    from tests.conftest import tiny_run_args
    from tests.test_distributed import spawn

    arg_sets = [
        tiny_run_args(toy_data, tmp_path / "run", "data.val_sets=[hf://faces/eval/toy_val.bin]"),
        tiny_run_args(toy_data, tmp_path / "run2", "data.val_sets=[hf://faces/eval/absent.bin]"),
    ]
    ranks = spawn(_pins_on_each_rank, 2, arg_sets, tmp=tmp_path)  # children inherit HF_HUB_CACHE / HF_HUB_OFFLINE
    pinned = f"hf://faces/eval@{warm['data_commit']}/toy_val.bin"
    for ok, failed in ranks:
        assert ok["val_sets"] == [pinned]
        assert Path(ok["local"][0]).read_bytes() == (toy_data / "toy_val.bin").read_bytes()
        assert failed == ranks[0][1] and failed["error"].startswith(f"hf://faces/eval/absent.bin: {COLD}")
