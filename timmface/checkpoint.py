"""Checkpoints: atomic writes, safe reads, discovery and pruning.

A run directory holds ``checkpoints/step_XXXXXXXX.pt``. Each file is written to a temporary
name in the same folder, flushed to disk and renamed, so a crash (or a full disk) never leaves a
half-written checkpoint under the real name; old checkpoints are pruned only after the new one is
complete. Reads use ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from timmface.errors import CheckpointError

FORMAT = "timmface"
VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
_PREFIXES = ("module.", "_orig_mod.")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def clean_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes anywhere in the keys."""
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through a temporary file + rename; raises CheckpointError on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"{path}: could not write checkpoint ({e.__class__.__name__}: {e})") from e


def save_checkpoint(state: dict[str, Any], output_dir: str | Path, step: int, keep_last: int = 3) -> Path:
    """Write ``state`` as the step's checkpoint, then prune all but the newest ``keep_last``."""
    path = checkpoint_path(output_dir, step)
    atomic_save({"format": FORMAT, "version": VERSION, "step": step, **state}, path)
    prune_checkpoints(output_dir, keep_last)
    return path


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    for _, p in list_checkpoints(output_dir)[:-keep_last]:
        p.unlink(missing_ok=True)
    folder = Path(output_dir) / "checkpoints"
    if folder.is_dir():  # temporary files left by a process killed mid-write
        for p in folder.glob(".step_*.pt.tmp*"):
            pid = p.name.rsplit("tmp", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a timmface checkpoint (weights only); CheckpointError with one line if it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: refused to load: the file contains Python objects beyond tensors and plain data "
                "(loading it could run code)"
            ) from e
        raise CheckpointError(f"{path}: not a readable checkpoint ({e.__class__.__name__}: {text[:200]})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a timmface training checkpoint (no 'format: {FORMAT}' entry)")
    if int(obj.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {obj['version']} is newer than this timmface ({VERSION})")
    return obj


def load_resume(resume: str, output_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its contents, or None to start fresh.

    ``auto``: the newest *readable* checkpoint in ``output_dir`` (an unreadable one is reported and
    skipped), or None when there is none. A directory: its newest checkpoint. A file: that file.
    """
    if not resume:
        return None
    if resume == "auto":
        for _, path in reversed(list_checkpoints(output_dir)):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as e:
                warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
        return None
    p = Path(resume)
    if p.is_dir():
        found = list_checkpoints(p)
        if not found:
            raise CheckpointError(f"{p}: resume folder holds no checkpoints/step_*.pt")
        p = found[-1][1]
    return p, load_checkpoint(p)
