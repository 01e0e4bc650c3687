"""Hugging Face Hub ids wherever timmface takes a model or an evaluation set.

Two spellings, each resolved through ``huggingface_hub`` into its cache (so ``HF_HUB_OFFLINE=1`` works from a
warm cache) and then handed to the same code as a local path:

``hf-hub:OWNER/REPO[@REVISION][/PATH]``
    a model repository (timm's ``hf-hub:`` spelling, plus an optional file or folder inside it). Without a
    PATH the repository must hold one model: a timm folder (``config.json`` naming an ``architecture`` +
    the weights timm's loader would pick) or exactly one weights file (``.safetensors``, ``.pth``, ``.pt``,
    ``.ckpt``, ``.onnx``, ``.bin``); a repository with several asks for ``hf-hub:OWNER/REPO/FILE``.
``hf://[datasets/]OWNER/REPO[@REVISION]/PATH``
    one file of a dataset repository (``huggingface_hub.HfFileSystem``'s spelling, ``datasets/`` optional):
    the ``.bin`` verification sets of ``data.val_sets`` and ``eval --bins``. ``@REVISION`` is accepted here
    too, so a pinned spec (below) can be given back.

REVISION is a branch, tag or commit hash (``refs/pr/N`` and ``%2F``-quoted names work). A resolution
yields the commit and the repository files used; :attr:`Resolved.pinned` spells them out
(``hf-hub:OWNER/REPO@<commit>/model.safetensors``): what runs record in ``config.yaml`` / ``eval.json``,
and what gives exactly the same bytes when given back. Commit-pinned resolutions are remembered for the
life of the process (a commit's files never change), so loading and fingerprinting resolve once.

Online, the repository is listed with one ``repo_info`` call and only the chosen files are downloaded;
offline (``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached, the listing is the cache's snapshot of the
revision (``<cache>/models--OWNER--REPO/{refs,snapshots,blobs}``). Every problem -- a cold cache while
offline, a missing repository, revision or file, a gated repository, a repository with no recognisable
weights -- is one line (:class:`~timmface.errors.TeacherError` for models, :class:`~timmface.errors.DataError`
for datasets) naming the spec.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote

from timmface.errors import ConfigError, DataError, TeacherError, TimmfaceError

__all__ = [
    "DATA_PREFIX",
    "MODEL_PREFIX",
    "TIMM_WEIGHT_FILES",
    "HubRef",
    "Resolved",
    "check_repo_id",
    "data_file",
    "is_data_spec",
    "is_hub_spec",
    "is_model_spec",
    "parse",
    "pin",
    "resolve_data_file",
    "resolve_model",
    "resumed_pin",
    "timm_weights_name",
]

MODEL_PREFIX = "hf-hub:"
DATA_PREFIX = "hf://"

# the files timm's local-dir loader looks for first, in its order (timm/models/_hub.py _PREFERRED_FILES), then
# any file with one of these endings, in this order (_EXT_PRIORITY)
TIMM_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
    "open_clip_model.safetensors",
)
_TIMM_EXT_PRIORITY = (".safetensors", ".pth", ".pth.tar", ".bin")
# what a repository's weights can be stored as (teachers.load_teacher reads each by its contents)
WEIGHT_ENDINGS = (".safetensors", ".pth", ".pt", ".ckpt", ".onnx", ".bin", ".pth.tar")

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
# OWNER/REPO, then @REVISION (refs/pr/N may hold slashes), then /PATH
_SPEC = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>refs/pr/\d+|[^/@]+))?(?:/(?P<path>[^@]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_FORMS = {"model": f"{MODEL_PREFIX}OWNER/REPO[@REVISION][/FILE]", "dataset": f"{DATA_PREFIX}OWNER/REPO[@REVISION]/FILE"}


def is_model_spec(value: object) -> bool:
    """True for ``hf-hub:...`` (a model repository)."""
    return isinstance(value, str) and value.startswith(MODEL_PREFIX)


def is_data_spec(value: object) -> bool:
    """True for ``hf://...`` (a file in a dataset repository)."""
    return isinstance(value, str) and value.startswith(DATA_PREFIX)


def is_hub_spec(value: object) -> bool:
    return is_model_spec(value) or is_data_spec(value)


def check_repo_id(repo_id: str, what: str = "repository id") -> str:
    """``repo_id`` if it is ``OWNER/NAME`` as the Hub spells ids, else a one-line :class:`ConfigError`."""
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ConfigError(f"{what}: '{repo_id}' is not a Hub repository id (expected OWNER/NAME)")
    return repo_id


@dataclass(frozen=True)
class HubRef:
    """A parsed spec: which repository, at which revision, and which file or folder inside it."""

    repo_id: str
    repo_type: str
    """``"model"`` (``hf-hub:``) or ``"dataset"`` (``hf://``)."""
    revision: str | None
    """As given (``None``: the default branch, ``main``)."""
    path: str
    """A file or folder inside the repository; ``""`` for the whole repository."""

    def spec(self, revision: str | None = None, path: str | None = None) -> str:
        """This reference spelled back, optionally at another revision / path."""
        rev = self.revision if revision is None else revision
        sub = self.path if path is None else path
        prefix = MODEL_PREFIX if self.repo_type == "model" else DATA_PREFIX
        return prefix + self.repo_id + (f"@{rev}" if rev else "") + (f"/{sub}" if sub else "")

    @property
    def url(self) -> str:
        from huggingface_hub import constants

        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{constants.ENDPOINT}/{kind}{self.repo_id}"


def parse(spec: str) -> HubRef:
    """``hf-hub:OWNER/REPO[@REVISION][/PATH]`` or ``hf://[datasets/]OWNER/REPO[@REVISION]/PATH`` -> :class:`HubRef`."""
    if is_model_spec(spec):
        repo_type, body = "model", spec[len(MODEL_PREFIX) :]
    elif is_data_spec(spec):
        repo_type, body = "dataset", spec[len(DATA_PREFIX) :]
        body = body.removeprefix("datasets/")
    else:
        raise ConfigError(f"{spec}: not a Hub spec ({_FORMS['model']} or {_FORMS['dataset']})")
    m = _SPEC.match(body)
    if m is None or "--" in m["repo"] or ".." in m["repo"]:
        raise ConfigError(f"{spec}: not a Hub spec: expected {_FORMS[repo_type]}")
    path = (m["path"] or "").strip("/")
    if any(part in (".", "..") for part in path.split("/")):
        raise ConfigError(f"{spec}: '.' and '..' are not allowed in a path inside a repository")
    ref = HubRef(m["repo"], repo_type, unquote(m["rev"]) if m["rev"] else None, path)
    if repo_type == "dataset" and not path:
        raise ConfigError(f"{spec}: name a file of the dataset repository: {_FORMS['dataset']}")
    return ref


@dataclass(frozen=True)
class Resolved:
    """A spec resolved to one commit and to files in the local cache."""

    ref: HubRef
    commit: str
    snapshot: Path
    """The cache folder of this commit (``<cache>/models--OWNER--REPO/snapshots/<commit>``)."""
    local: Path
    """What to load: a file, or a folder (a timm folder: ``config.json`` + weights) inside :attr:`snapshot`."""
    files: tuple[str, ...]
    """The repository paths the weights come from; the last one is the weights file."""

    @property
    def pinned(self) -> str:
        """``hf-hub:OWNER/REPO@<commit>/<weights file>``: names exactly these bytes, and resolves back to them."""
        return self.ref.spec(revision=self.commit, path=self.files[-1])

    def record(self) -> dict[str, Any]:
        """What a result stores about where its weights / data came from."""
        return {
            "spec": self.pinned,
            "repo_id": self.ref.repo_id,
            "repo_type": self.ref.repo_type,
            "revision": self.ref.revision or "main",
            "commit": self.commit,
            "files": list(self.files),
        }

    def rename(self, message: str) -> str:
        """``message`` with cache paths as hub paths: ``.../snapshots/<commit>/x`` -> ``hf-hub:O/R@<commit>/x``."""
        return message.replace(str(self.snapshot), self.ref.spec(revision=self.commit, path=""))


# ------------------------------------------------------------------------------------------------ resolution


def resolve_model(spec: str) -> Resolved:
    """Resolve ``hf-hub:OWNER/REPO[@REVISION][/PATH]`` to a commit and a file or timm folder in the cache."""
    ref = parse(spec)
    if ref.repo_type != "model":
        raise ConfigError(f"{spec}: hf:// names a file of a dataset repository; a model is {_FORMS['model']}")
    return _memoised(ref, _resolve_model)


def resolve_data_file(spec: str) -> Resolved:
    """Resolve ``hf://OWNER/REPO[@REVISION]/PATH`` (a dataset repository) to one file in the cache."""
    if is_model_spec(spec):
        raise ConfigError(f"{spec}: hf-hub: names a model repository; a file of a dataset is {_FORMS['dataset']}")
    ref = parse(spec)
    return _memoised(ref, _resolve_data_file)


def pin(spec: str) -> str:
    """The pinned spec of a Hub spec (see :attr:`Resolved.pinned`); any other string unchanged."""
    if is_model_spec(spec):
        return resolve_model(spec).pinned
    if is_data_spec(spec):
        return resolve_data_file(spec).pinned
    return spec


def resumed_pin(spec: str, recorded: Iterable[str]) -> str | None:
    """The commit-pinned spec among ``recorded`` (a resumed run's config) that ``spec`` resolved to when the run
    started: same repository, and the same file or folder when ``spec`` names one. ``None`` when there is none or
    ``spec`` is itself pinned to a commit (then it is what the user asks for)."""
    if not is_hub_spec(spec):
        return None
    a = parse(spec)
    if a.revision and _COMMIT.match(a.revision):
        return None
    for other in recorded:
        if not is_hub_spec(other):
            continue
        b = parse(other)
        same_place = not a.path or b.path == a.path or b.path.startswith(a.path + "/")
        if (a.repo_id, a.repo_type) == (b.repo_id, b.repo_type) and b.revision and _COMMIT.match(b.revision):
            if same_place:
                return other
    return None


def data_file(value: str | os.PathLike[str]) -> tuple[Path, Resolved | None]:
    """A local path for a ``.bin`` (or any data file) given as a path or as ``hf://...``; and its resolution."""
    if is_data_spec(value):
        r = resolve_data_file(str(value))
        return r.local, r
    if is_model_spec(value):
        resolve_data_file(str(value))  # raises: a model id where a data file was expected
    return Path(value), None


_RESOLVED: dict[tuple[str, str], Resolved] = {}


def _memoised(ref: HubRef, resolve: Any) -> Resolved:
    """``resolve(ref)``, remembered under the pinned spec (a commit's files never change; a branch's may)."""
    cache = _cache_dir()
    pinned = bool(ref.revision and _COMMIT.match(ref.revision))
    hit = _RESOLVED.get((ref.spec(), cache)) if pinned else None
    if hit is not None and all((hit.snapshot / f).exists() for f in hit.files):
        return hit
    r = resolve(ref)
    _RESOLVED[(r.pinned, cache)] = dataclasses.replace(r, ref=parse(r.pinned))
    if pinned:
        _RESOLVED[(ref.spec(), cache)] = r
    return r


def _resolve_model(ref: HubRef) -> Resolved:
    with _errors(ref):
        commit, listing, complete = _listing(ref)
        fetched: dict[str, Path] = {}  # config.json is read while choosing: fetch it once
        files, folder = _choose(ref, commit, listing, complete, fetched)
        paths = [fetched.get(f) or _download(ref, f, local_only=not complete) for f in files]
    snapshot = _snapshot_of(paths[0])
    for moved in {_snapshot_of(p).name for p in paths} - {commit}:
        _fail(ref, f"the revision moved from {commit[:12]} to {moved[:12]} while downloading; run again")
    local = snapshot / folder if folder is not None else paths[-1]
    if folder is not None:
        # timm's local-dir loader picks the weights by name among what the cache folder holds
        picked = timm_weights_name(p.name for p in local.iterdir() if p.is_file())
        if picked is not None and picked != Path(files[-1]).name:
            _fail(ref, f"timm would load {picked} from this folder, not {Path(files[-1]).name}: give that file instead")
    return Resolved(ref, snapshot.name, snapshot, local, tuple(files))


def _resolve_data_file(ref: HubRef) -> Resolved:
    with _errors(ref):
        path = _download(ref, ref.path)
    snapshot = _snapshot_of(path)
    return Resolved(ref, snapshot.name, snapshot, path, (ref.path,))


def _choose(
    ref: HubRef, commit: str, listing: list[str], complete: bool, fetched: dict[str, Path]
) -> tuple[list[str], str | None]:
    """The repository files to fetch, and the folder to load (``None``: load the last file)."""
    where = ref.spec(revision=commit, path="")
    sub = ref.path
    if sub and sub in listing:
        folder = sub.rpartition("/")[0]
        config = f"{folder}/config.json" if folder else "config.json"
        if not sub.endswith(".onnx") and config in listing and _is_timm_config(ref, config, fetched, not complete):
            return [config, sub], folder
        return [sub], None
    inside = [f[len(sub) + 1 :] if sub else f for f in listing if not sub or f.startswith(sub + "/")]
    if sub and not inside:
        if not complete:
            _not_cached(ref)
        _fail(ref, f"no file or folder '{sub}' in {ref.repo_id} at {commit[:12]} (it holds {_names(listing)})")
    prefix = f"{sub}/" if sub else ""
    if "config.json" in inside and _is_timm_config(ref, prefix + "config.json", fetched, not complete):
        weights = timm_weights_name(n for n in inside if "/" not in n)
        if weights is None:
            if not complete:
                _not_cached(ref)
            _fail(ref, f"{where}/{prefix}config.json names a timm model but there is no weights file beside it")
        return [prefix + "config.json", prefix + weights], sub
    candidates = [n for n in inside if n.lower().endswith(WEIGHT_ENDINGS)]
    if len(candidates) == 1:
        return [prefix + candidates[0]], None
    if len(candidates) > 1:
        _fail(
            ref,
            f"holds {len(candidates)} candidate weight files ({_names(candidates, 8)}): pick one with "
            f"{MODEL_PREFIX}OWNER/REPO/FILE, e.g. {ref.spec(path=prefix + candidates[0])}",
        )
    if not complete:
        _not_cached(ref, cached=inside)
    _fail(
        ref,
        f"no recognisable weights in {where}{'/' + sub if sub else ''}: it holds {_names(inside, 8) or 'no files'} "
        f"(expected a timm folder -- config.json + model.safetensors -- or a {', '.join(WEIGHT_ENDINGS)} file)",
    )


def _is_timm_config(ref: HubRef, path: str, fetched: dict[str, Path], local_only: bool) -> bool:
    """Whether the repository's ``config.json`` at ``path`` describes a timm model (names an ``architecture``)."""
    local = fetched[path] = _download(ref, path, local_only)  # small; a download error is the repository's error
    try:
        config = json.loads(local.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not JSON (or not UTF-8): not a timm config
        return False
    return isinstance(config, dict) and isinstance(config.get("architecture"), str)


def timm_weights_name(names: Iterable[str]) -> str | None:
    """The weights file timm's local-dir loader reads from a folder holding ``names`` (``None``: none)."""
    names = sorted(names)
    for name in TIMM_WEIGHT_FILES:
        if name in names:
            return name
    for ext in _TIMM_EXT_PRIORITY:
        found = [n for n in names if n.endswith(ext)]
        if found:
            return found[0]
    return None


# ------------------------------------------------------------------------------------------ huggingface_hub calls


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    now = (os.environ.get("HF_HUB_OFFLINE") or "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or now


def _cache_dir() -> str:
    """The hub cache: ``HF_HUB_CACHE`` when set now, else huggingface_hub's own default."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _storage(ref: HubRef) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return Path(_cache_dir()) / repo_folder_name(repo_id=ref.repo_id, repo_type=ref.repo_type)


def _cached_snapshot(ref: HubRef) -> Path | None:
    """The cache's snapshot folder of ``ref``'s revision (``refs/<branch>`` -> commit), if there is one."""
    storage = _storage(ref)
    revision = ref.revision or "main"
    commit = revision
    if not _COMMIT.match(revision):
        try:
            commit = (storage / "refs" / revision).read_text().strip()
        except OSError:
            return None
    snapshot = storage / "snapshots" / commit
    return snapshot if _COMMIT.match(commit) and snapshot.is_dir() else None


def _listing(ref: HubRef) -> tuple[str, list[str], bool]:
    """``(commit, repository files, complete)``: from the Hub when online, else from the cache (maybe partial)."""
    if not _offline():
        import huggingface_hub

        errors = _error_classes()
        try:
            info = huggingface_hub.HfApi().repo_info(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision)
        except Exception as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if isinstance(e, errors["server"]) or (isinstance(e, errors["HfHubHTTPError"]) and status in (401, 403)):
                raise  # the Hub answered: no such repository / revision, gated, disabled, unauthorised
            # no connection, Hub down: use the cache, as huggingface_hub's own downloads do
            snapshot = _cached_snapshot(ref)
            if snapshot is None:
                _not_cached(ref, f"cannot reach the Hub ({_first_line(e)})")
            return snapshot.name, _files_in(snapshot), False
        siblings = getattr(info, "siblings", None)
        files = (
            [s.rfilename for s in siblings]
            if siblings is not None
            else huggingface_hub.HfApi().list_repo_files(ref.repo_id, repo_type=ref.repo_type, revision=info.sha)
        )
        return str(info.sha), sorted(files), True
    snapshot = _cached_snapshot(ref)
    if snapshot is None:
        _not_cached(ref)
    return snapshot.name, _files_in(snapshot), False


def _files_in(snapshot: Path) -> list[str]:
    # is_file() follows the cache's symlinks into blobs/: a dangling link (blob deleted) is not a cached file
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _download(ref: HubRef, path: str, local_only: bool = False) -> Path:
    """``hf_hub_download`` of one repository file into the cache; from the cache alone when offline, or when
    ``local_only`` (the Hub just failed to answer: no point in waiting for it once per file)."""
    import huggingface_hub

    local = huggingface_hub.hf_hub_download(
        ref.repo_id, path, repo_type=ref.repo_type, revision=ref.revision, cache_dir=_cache_dir(),
        local_files_only=local_only or _offline(),
    )  # fmt: skip
    return Path(local)


def _snapshot_of(path: Path) -> Path:
    parts = path.parts
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    return Path(*parts[: i + 2])


def _error_classes() -> dict[str, Any]:
    """huggingface_hub's exception classes, from ``huggingface_hub.utils`` (0.23+) or ``.errors`` (newer)."""
    import huggingface_hub.utils as utils

    try:
        import huggingface_hub.errors as errors
    except ImportError:  # pragma: no cover - every version since 0.24 has it
        errors = utils

    class _Never(Exception):
        pass

    def get(name: str) -> type[BaseException]:
        return getattr(errors, name, None) or getattr(utils, name, None) or _Never

    out = {
        name: get(name)
        for name in (
            "GatedRepoError",
            "RepositoryNotFoundError",
            "RevisionNotFoundError",
            "DisabledRepoError",
            "LocalEntryNotFoundError",
            "EntryNotFoundError",
            "OfflineModeIsEnabled",
            "HfHubHTTPError",
        )
    }
    out["server"] = (
        out["RepositoryNotFoundError"],
        out["RevisionNotFoundError"],
        out["DisabledRepoError"],
    )
    return out


@contextmanager
def _errors(ref: HubRef) -> Iterator[None]:
    """huggingface_hub's exceptions -> one line naming the spec (the library's own are paragraphs)."""
    e = _error_classes()
    login = "set HF_TOKEN or log in with the huggingface_hub CLI"
    try:
        yield
    except TimmfaceError:
        raise
    except e["GatedRepoError"]:
        _fail(ref, f"gated repository: accept its conditions at {ref.url} (logged in), then {login}")
    except e["RepositoryNotFoundError"]:
        _fail(ref, f"no {ref.repo_type} repository '{ref.repo_id}' on the Hub (if it is private: {login})")
    except e["RevisionNotFoundError"]:
        _fail(ref, f"repository '{ref.repo_id}' has no revision '{ref.revision}'")
    except e["DisabledRepoError"]:
        _fail(ref, f"repository '{ref.repo_id}' has been disabled by its owner")
    except (e["LocalEntryNotFoundError"], e["OfflineModeIsEnabled"]) as err:
        _not_cached(ref, f"cannot reach the Hub ({_first_line(err)})")
    except e["EntryNotFoundError"]:
        _fail(ref, f"no file '{ref.path}' in {ref.repo_id} at revision {ref.revision or 'main'}")
    except e["HfHubHTTPError"] as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            _fail(ref, f"not authorised ({status}): {login}")
        _fail(ref, f"the Hub answered: {_first_line(err)}")
    except OSError as err:  # disk full, permissions in the cache, connection errors of the HTTP library
        _fail(ref, f"cannot fetch it: {_first_line(err)}")


def _fail(ref: HubRef, message: str) -> NoReturn:
    cls = TeacherError if ref.repo_type == "model" else DataError
    raise cls(f"{ref.spec()}: {message}") from None


def _not_cached(ref: HubRef, online_problem: str = "cannot reach the Hub", cached: list[str] | None = None) -> NoReturn:
    """Not (all) in the cache, and the Hub cannot be asked: offline mode, or no connection."""
    held = f" (cached: {_names(cached, 8)})" if cached else ""
    if _offline():
        _fail(
            ref,
            f"not in the local cache and HF_HUB_OFFLINE is set: run once with network access to fill the cache "
            f"({_cache_dir()}), or unset HF_HUB_OFFLINE{held}",
        )
    _fail(ref, f"{online_problem} and it is not in the local cache ({_cache_dir()}){held}")


def _names(names: list[str], limit: int = 8) -> str:
    from teachers.detect import format_keys

    return format_keys(names, limit)


def _first_line(error: BaseException) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__
