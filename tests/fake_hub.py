"""A Hugging Face Hub without a network: repositories on a fake "server", and the local hub cache.

The cache is laid out exactly as ``huggingface_hub`` lays it out (``<cache>/models--OWNER--REPO/`` and
``datasets--OWNER--REPO/`` with ``refs/<branch>`` holding a commit hash, ``blobs/<sha256>`` holding the
bytes and ``snapshots/<commit>/<path>`` relative symlinks into ``blobs/``), so the real library -- and timm's
``hf-hub:`` loader through it -- reads it offline. Online behaviour is simulated by replacing the two calls
that touch the network (``HfApi.repo_info`` and ``hf_hub_download``) with ones answered from the fake server,
raising huggingface_hub's own exception classes; uploads (``HfApi.create_repo`` / ``upload_folder``) add a
commit to the server. Every test using this also blocks sockets, so a missed call fails instead of leaving.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

_CLASSES = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError")


def hub_error(name: str, message: str) -> BaseException:
    """An instance of huggingface_hub's exception class ``name`` (``huggingface_hub.errors`` in new versions,
    ``huggingface_hub.utils`` in 0.23), built without an HTTP response (their constructors differ by version)."""
    import huggingface_hub.utils as utils

    try:
        import huggingface_hub.errors as errors
    except ImportError:
        errors = utils
    cls = getattr(errors, name, None) or getattr(utils, name)
    if name == "EntryNotFoundError":  # what a download of a missing file raises in 1.x+ (a subclass in 2.x)
        cls = getattr(errors, "RemoteEntryNotFoundError", None) or cls
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"network access attempted: {args}")


class FakeHub:
    """Repositories on a fake server (``commit``) and their copies in the local cache (``download``)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        # (repo_type, repo_id) -> {"refs": {branch: commit}, "commits": {commit: {path: bytes}}}
        self.repos: dict[tuple[str, str], dict[str, Any]] = {}
        self.gated: set[str] = set()
        self.calls: list[tuple[str, str, str | None]] = []

    # ------------------------------------------------------------------------------------------ the server

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | Path],
        *,
        repo_type: str = "model",
        branch: str = "main",
        cached: bool = True,
    ) -> str:
        """A new commit on ``branch`` (its parent's files plus ``files``); also in the cache unless ``cached=False``."""
        repo = self.repos.setdefault((repo_type, repo_id), {"refs": {}, "commits": {}})
        parent = repo["refs"].get(branch)
        content = dict(repo["commits"][parent]) if parent else {}
        for path, data in files.items():
            content[path] = data.read_bytes() if isinstance(data, Path) else data
            if isinstance(content[path], str):
                content[path] = content[path].encode()
        digest = hashlib.sha1(f"{parent}\n".encode())
        for path in sorted(content):
            digest.update(f"{path}\0{hashlib.sha256(content[path]).hexdigest()}\n".encode())
        commit = digest.hexdigest()
        repo["commits"][commit] = content
        repo["refs"][branch] = commit
        if cached:
            for path in content:
                self.download(repo_id, path, repo_type=repo_type, revision=branch)
        return commit

    def _resolve(self, repo_id: str, repo_type: str, revision: str | None) -> tuple[str, dict[str, bytes]]:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise hub_error("RepositoryNotFoundError", f"404 Client Error. Repository Not Found for url: {repo_id}")
        rev = revision or "main"
        commit = rev if rev in repo["commits"] else repo["refs"].get(rev)
        if commit is None:
            raise hub_error("RevisionNotFoundError", f"404 Client Error. Revision Not Found: {rev}")
        return commit, repo["commits"][commit]

    # ---------------------------------------------------------------------------------------- the cache

    def storage(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.cache / f"{repo_type}s--{repo_id.replace('/', '--')}"

    def download(self, repo_id: str, path: str, *, repo_type: str = "model", revision: str | None = None) -> Path:
        """What ``hf_hub_download`` leaves in the cache: the blob, the snapshot link, and the branch's ref."""
        commit, content = self._resolve(repo_id, repo_type, revision)
        if path not in content:
            raise hub_error("EntryNotFoundError", f"404 Client Error. Entry Not Found for url: {path}")
        storage = self.storage(repo_id, repo_type)
        blob = storage / "blobs" / hashlib.sha256(content[path]).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content[path])
        link = storage / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            os.symlink(os.path.relpath(blob, link.parent), link)
        if revision and revision != commit:
            ref = storage / "refs" / revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(commit)  # huggingface_hub writes the hash without a newline
        return link

    # ---------------------------------------------------------------------------------------- going online

    def online(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Answer huggingface_hub's network calls from the fake server (sockets stay blocked)."""
        import huggingface_hub
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

        def repo_info(api: Any, repo_id: str, *, repo_type: str | None = None, revision: str | None = None, **kw: Any):
            kind = repo_type or "model"
            self.calls.append(("repo_info", repo_id, revision))
            commit, content = self._resolve(repo_id, kind, revision)
            return SimpleNamespace(sha=commit, siblings=[SimpleNamespace(rfilename=p) for p in sorted(content)])

        def hf_hub_download(repo_id: str, filename: str, *, repo_type: str | None = None, revision=None, **kw: Any):
            self.calls.append(("download", repo_id, filename))
            if repo_id in self.gated:
                raise hub_error("GatedRepoError", f"403 Client Error. Cannot access gated repo {repo_id}")
            kind, rev = repo_type or "model", revision or "main"  # the library's defaults
            return str(self.download(repo_id, filename, repo_type=kind, revision=rev))

        def create_repo(api: Any, repo_id: str, *, repo_type: str | None = None, **kw: Any) -> str:
            self.repos.setdefault((repo_type or "model", repo_id), {"refs": {}, "commits": {}})
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api: Any, *, repo_id: str, folder_path: str, repo_type: str | None = None, **kw: Any):
            root = Path(folder_path)
            files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
            commit = self.commit(repo_id, files, repo_type=repo_type or "model", cached=False)
            return SimpleNamespace(oid=commit, commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}")

        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)

    def offline(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Back to ``HF_HUB_OFFLINE=1`` and the real library (the cache is all there is)."""
        import huggingface_hub
        from huggingface_hub import constants

        for target, name in (
            (huggingface_hub.HfApi, "repo_info"),
            (huggingface_hub, "hf_hub_download"),
            (huggingface_hub.HfApi, "create_repo"),
            (huggingface_hub.HfApi, "upload_folder"),
        ):
            monkeypatch.setattr(target, name, _REAL[name])
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        forget_resolutions(monkeypatch)


def _real() -> dict[str, Any]:
    import huggingface_hub

    return {
        "repo_info": huggingface_hub.HfApi.repo_info,
        "hf_hub_download": huggingface_hub.hf_hub_download,
        "create_repo": huggingface_hub.HfApi.create_repo,
        "upload_folder": huggingface_hub.HfApi.upload_folder,
    }


_REAL = _real()


def forget_resolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process as far as :mod:`timmface.hub` is concerned (no remembered resolutions)."""
    import timmface.hub

    monkeypatch.setattr(timmface.hub, "_RESOLVED", {})


def use_fake_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """``HF_HUB_CACHE=cache``, ``HF_HUB_OFFLINE=1`` (environment and huggingface_hub's constants), no sockets."""
    import huggingface_hub.file_download as file_download
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    if hasattr(file_download, "HF_HUB_CACHE"):  # huggingface_hub < 0.24 imported the constant by name
        monkeypatch.setattr(file_download, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    forget_resolutions(monkeypatch)
    return FakeHub(cache)
