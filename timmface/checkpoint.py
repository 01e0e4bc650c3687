"""Checkpoints: atomic writes, safe reads, discovery and pruning.

A run directory holds ``checkpoints/step_XXXXXXXX.pt``. Each file is written to a temporary
name in the same folder, flushed to disk and renamed, so a crash (or a full disk) never leaves a
half-written checkpoint under the real name; old checkpoints are pruned only after the new one is
complete. Reads use ``torch.load(weights_only=True)``: a checkpoint cannot run code.

A multi-rank run (or one with sharded class centres) also writes one file per rank,
``step_XXXXXXXX.shard{r}of{W}.pt``, holding what differs between ranks: the RNG state and, with
``head.sharded``, that rank's class centres and their optimiser state (``head_rows``). Every rank
writes its file, the ranks meet at a barrier, then rank 0 writes ``step_XXXXXXXX.pt`` (everything
replicated; ``rank_files: W`` names how many shard files belong to it). A step is complete when the
main file and all ``W`` shard files exist; listing, pruning and ``resume=auto`` only see complete steps.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from timmface.errors import CheckpointError
from timmface.faults import fault

FORMAT = "timmface"
VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
_SHARD = re.compile(r"^step_(\d{8,})\.shard(\d+)of(\d+)\.pt$")
_TMP_STEP = re.compile(r"^\.step_(\d{8,})(?:\.shard\d+of\d+)?\.pt\.tmp\d+$")
_PREFIXES = ("module.", "_orig_mod.")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6 (what torch.load sniffs, too)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle asks for code (a global beyond tensors and plain data): never skipped silently."""


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}.pt"


def shard_path(output_dir: str | Path, step: int, rank: int, world_size: int) -> Path:
    """``checkpoints/step_XXXXXXXX.shard{rank}of{world_size}.pt``: rank ``rank``'s own state."""
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}.shard{rank}of{world_size}.pt"


def _scan(folder: Path) -> tuple[dict[int, Path], dict[int, dict[int, set[int]]]]:
    """Main files by step, and shard ranks present by step and world size."""
    mains: dict[int, Path] = {}
    shards: dict[int, dict[int, set[int]]] = {}
    if not folder.is_dir():
        return mains, shards
    for p in folder.iterdir():
        if m := _NAME.match(p.name):
            if p.is_file():
                mains[int(m.group(1))] = p
        elif m := _SHARD.match(p.name):
            step, rank, world = int(m.group(1)), int(m.group(2)), int(m.group(3))
            shards.setdefault(step, {}).setdefault(world, set()).add(rank)
    return mains, shards


def _complete(groups: dict[int, set[int]] | None) -> bool:
    """No shard files at all, or one world size with every rank's file."""
    return not groups or any(ranks >= set(range(world)) for world, ranks in groups.items())


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path of the main file)`` of the complete checkpoints of a run, oldest first."""
    mains, shards = _scan(Path(output_dir) / "checkpoints")
    return sorted((step, p) for step, p in mains.items() if _complete(shards.get(step)))


def checkpoint_shards(path: str | Path, ckpt: Mapping[str, Any]) -> list[Path]:
    """The per-rank files that belong to the main checkpoint ``path`` (empty when it has none);
    CheckpointError when one is missing."""
    path = Path(path)
    world = int(ckpt.get("rank_files") or 0)
    m = _NAME.match(path.name)
    if world == 0 or not m:
        return []
    files = [path.with_name(f"step_{m.group(1)}.shard{r}of{world}.pt") for r in range(world)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: incomplete checkpoint: {len(missing)} of {world} rank files missing ({missing[0]})"
        )
    return files


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


class _Writer:
    """The file torch.save writes to, keeping the first OSError: torch's zip writer turns a failed write
    into ``RuntimeError: ... unexpected pos``, which would hide "No space left on device"."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through a temporary file + rename; raises CheckpointError on failure.

    The temporary file sits in the same folder (so the rename is atomic) under a name no checkpoint
    listing matches, and is removed on any failure; ``path`` itself is only ever a complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer: _Writer | None = None
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        fault("checkpoint.written", file=tmp, name=path.name)  # test-only (timmface/faults.py)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        cause = writer.error if writer is not None and writer.error is not None else e
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).strip()
        reason = (reason.splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: could not write checkpoint ({cause.__class__.__name__}: {reason})") from e


def save_checkpoint(
    state: dict[str, Any], output_dir: str | Path, step: int, keep_last: int = 3, rank_files: int = 0
) -> Path:
    """Write ``state`` as the step's main checkpoint, then prune all but the newest ``keep_last``.

    ``rank_files``: how many ``shard{r}of{W}`` files (already written) belong to this step; files of
    the same step left by a run at another world size are removed first, so they cannot be mistaken
    for this checkpoint's.
    """
    path = checkpoint_path(output_dir, step)
    _, shards = _scan(path.parent)
    for world in shards.get(step, {}):
        if world != rank_files:
            for r in range(world):
                shard_path(output_dir, step, r, world).unlink(missing_ok=True)
    atomic_save({"format": FORMAT, "version": VERSION, "step": step, "rank_files": rank_files, **state}, path)
    fault("checkpoint.renamed", file=path)  # test-only: a kill here leaves more than keep_last, all complete
    prune_checkpoints(output_dir, keep_last)  # only now: the new checkpoint is complete on disk
    return path


def save_shard(state: dict[str, Any], output_dir: str | Path, step: int, rank: int, world_size: int) -> Path:
    """Write rank ``rank``'s own state for ``step`` (call on every rank before the main file is written)."""
    path = shard_path(output_dir, step, rank, world_size)
    header = {"format": FORMAT, "version": VERSION, "step": step, "rank": rank, "world_size": world_size}
    atomic_save({**header, **state}, path)
    return path


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; delete older steps' files, complete or not
    (a step older than the newest complete one that is incomplete was left by a crash)."""
    folder = Path(output_dir) / "checkpoints"
    mains, shards = _scan(folder)
    complete = [s for s, _ in list_checkpoints(output_dir)]
    if complete:
        keep = set(complete[-keep_last:])
        for step in set(mains) | set(shards):
            if step < complete[-1] and step not in keep:
                if step in mains:
                    mains[step].unlink(missing_ok=True)
                for world, ranks in shards.get(step, {}).items():
                    for r in ranks:
                        shard_path(output_dir, step, r, world).unlink(missing_ok=True)
    if folder.is_dir():  # temporary files left by a process killed mid-write
        newest = complete[-1] if complete else -1
        for p in folder.glob(".step_*.pt.tmp*"):
            pid = p.name.rsplit("tmp", 1)[-1]
            m = _TMP_STEP.match(p.name)
            # a step up to the newest complete one is finished (renamed or failed): its temporary file is stale
            # whoever wrote it -- a restarted container reuses PIDs, so "that PID is alive" proves nothing
            stale = m is not None and int(m.group(1)) <= newest
            if stale or (pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))):
                p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def zip_problem(path: str | Path) -> str | None:
    """Why a ``torch.save`` zip must not be handed to ``torch.load``, or None (also for non-zip files).

    torch's zip reader allocates each record's claimed size before reading it, and a claim it cannot
    allocate aborts the process (``std::bad_alloc``; found by fuzzing). Python's zipfile reads the same
    central directory without allocating from it, so every entry is checked against the file's size first.
    torch writes uncompressed (stored) entries only.
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != _ZIP_MAGIC:
            return None
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except Exception as e:  # BadZipFile, struct.error, ValueError, ...: any way a zip can be broken
        return f"corrupt zip container ({e.__class__.__name__}: {str(e).strip()[:120]})"
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            return f"zip entry {info.filename!r} is compressed, which torch.save never writes"
        if max(info.file_size, info.compress_size) + info.header_offset > size:
            return f"zip entry {info.filename!r} claims {info.file_size} bytes at byte {info.header_offset} of {size}"
    return None


# opcodes that build objects by calling code; torch's weights-only unpickler has no handler for them and
# says "Unsupported operand N": STACK_GLOBAL, INST, OBJ, NEWOBJ_EX, EXT1, EXT2, EXT4
_CODE_OPCODES = {0x93, ord("i"), ord("o"), 0x92, 0x82, 0x83, 0x84}
_REFUSALS = ("Unsupported global", "unsupported GLOBAL", "Trying to call reduce", "Can only create new object",
             "Can only build", "Can only append", "Can only SETITEM", "Only persistent_load of storage")  # fmt: skip


_TORCH_PREAMBLE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def error_cause(error: BaseException) -> str:
    """The line of an exception's message that says what went wrong: torch.load wraps every weights-only
    unpickler error in paragraphs of advice, with the cause after "WeightsUnpickler error:" or on a line of
    its own (both forms occur)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    advice = [line for line in lines if not line.startswith(_TORCH_PREAMBLE) and not re.match(r"\(\d\)", line)]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            following = [x for x in lines[i + 1 :] if x in advice]
            if rest or following:
                return rest or following[0]
    return (advice or lines or [error.__class__.__name__])[0]


def refused_global(error: BaseException) -> str | None:
    """What a weights-only unpickling error refused (``'posix.system'``, ``'a non-data object'``), or None
    when the error is not a refusal (a corrupt or truncated file)."""
    cause = error_cause(error)
    m = re.search(r"Unsupported operand (\d+)", cause)
    if not any(r in cause for r in _REFUSALS) and not (m and int(m.group(1)) in _CODE_OPCODES):
        return None
    m = re.search(r"GLOBAL (\S+)", cause) or re.search(r"function (\S+)", cause)
    return f"'{m.group(1).rstrip('.')}'" if m else "a non-data object"


def _torch_load(path: Path, mmap: bool = False) -> Any:
    try:
        problem = zip_problem(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if problem is not None:
        raise CheckpointError(f"{path}: not a readable checkpoint ({problem})")
    with open(path, "rb") as f:
        zipped = f.read(4) == _ZIP_MAGIC
    if not zipped:  # timmface has only ever written zip checkpoints; the legacy format's reader trusts its sizes
        raise CheckpointError(f"{path}: not a timmface training checkpoint (not a torch.save zip file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        what = refused_global(e)
        if what is not None:
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file asks for {what}, which could run code "
                "(nothing was run; checkpoints are loaded weights-only)"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({e.__class__.__name__}: {error_cause(e)[:200]})"
        ) from None


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a timmface checkpoint (weights only); CheckpointError with one line if it cannot be used.

    ``mmap``: map the file instead of reading it (tensors are paged in when touched).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    obj = _torch_load(path, mmap)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a timmface training checkpoint (no 'format: {FORMAT}' entry)")
    version = obj.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):  # (int() of a tensor or text could raise)
        raise CheckpointError(f"{path}: not a timmface training checkpoint (version {str(version)[:40]!r})")
    if version > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version} is newer than this timmface ({VERSION})")
    return obj


# --------------------------------------------------------------------------------------------------
# Row-sharded class centres: read any row range, whatever world size wrote them
# --------------------------------------------------------------------------------------------------


def _row_entries(state: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and tuple(v.shape) == shape}


def read_head_rows(
    path: str | Path, ckpt: Mapping[str, Any], start: int, count: int, optim_index: int | None = None
) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """Class centres ``[start, start + count)`` (``count x D``) and their optimiser state, from a checkpoint.

    Works for a checkpoint with the full head (``head.weight`` ``C x D``; its optimiser state at
    ``optim_index``) and for a sharded one (rows spread over the rank files, read memory-mapped so a
    rank touches only the rows it needs). Optimiser entries shaped like the weight are sliced by
    rows; the others (AdamW's ``step``) are the same on every rank and taken once.
    """
    head = ckpt.get("head") or {}
    sharding = ckpt.get("sharding")
    if "weight" in head:  # the full matrix is in the main file
        weight = head["weight"]
        state = (ckpt.get("optimizer") or {}).get("state", {}).get(optim_index) if optim_index is not None else None
        optim = None
        if state is not None:
            rows = _row_entries(state, tuple(weight.shape))
            optim = {k: (v[start : start + count].clone() if k in rows else v) for k, v in state.items()}
        return weight[start : start + count].clone(), optim
    if not sharding:
        raise CheckpointError(f"{path}: checkpoint holds no class centres")
    weight_out: torch.Tensor | None = None
    optim_out: dict[str, Any] | None = None
    for shard_file in checkpoint_shards(path, ckpt):
        shard = load_checkpoint(shard_file, mmap=True)
        rows = shard.get("head_rows")
        if rows is None:
            raise CheckpointError(f"{shard_file}: rank file holds no class centres")
        s, n = int(rows["start"]), int(rows["count"])
        if weight_out is None:
            weight_out = rows["weight"].new_empty(count, rows["weight"].shape[1])
        lo, hi = max(start, s), min(start + count, s + n)
        if lo < hi:
            weight_out[lo - start : hi - start] = rows["weight"][lo - s : hi - s]
        state = rows.get("optim")
        if state is not None:
            sharded = _row_entries(state, tuple(rows["weight"].shape))
            if optim_out is None:
                optim_out = {
                    k: (v.new_empty(count, *v.shape[1:]) if k in sharded else v.clone()) for k, v in state.items()
                }
            for k in sharded:
                if lo < hi:
                    optim_out[k][lo - start : hi - start] = state[k][lo - s : hi - s]
    assert weight_out is not None
    return weight_out, optim_out


def merge_checkpoint(path: str | Path, ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sharded checkpoint as one plain checkpoint: ``head.weight`` ``C x D`` and its optimiser state
    merged back in place (``rank_files: 0``, ``sharding: None``). A plain checkpoint is returned as is."""
    path = Path(path)
    ckpt = dict(load_checkpoint(path) if ckpt is None else ckpt)
    sharding = ckpt.get("sharding")
    if not sharding:
        return ckpt
    num_classes = int(sharding["num_classes"])
    weight, optim = read_head_rows(path, ckpt, 0, num_classes)
    ckpt["head"] = {**(ckpt.get("head") or {}), "weight": weight}
    if optim is not None:
        optimizer = dict(ckpt["optimizer"])
        optimizer["state"] = {**optimizer["state"], int(sharding["optim_index"]): optim}
        ckpt["optimizer"] = optimizer
    ckpt.update(sharding=None, rank_files=0, merged_from={"world_size": int(sharding["world_size"])})
    return ckpt


def load_resume(resume: str, output_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its contents, or None to start fresh.

    ``auto``: the newest *readable* checkpoint in ``output_dir`` (an unreadable one is reported and
    skipped), or None when there is none. A directory: its newest checkpoint. A file: that file.

    With ``auto``, a checkpoint that asks for code (:class:`UnsafeCheckpointError`) stops the run instead of
    being skipped (someone put it there), and so does a run whose checkpoints are all unreadable: starting
    afresh would prune them.
    """
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        first: CheckpointError | None = None
        for _, path in reversed(found):
            try:
                ckpt = load_checkpoint(path)
                checkpoint_shards(path, ckpt)  # every rank file present
                return path, ckpt
            except UnsafeCheckpointError:
                raise
            except CheckpointError as e:
                first = first or e
                warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
        if first is not None:
            raise CheckpointError(
                f"{output_dir}: none of its {len(found)} checkpoints can be read (newest: {first}); "
                "to start over, run without resume=auto and with overwrite=true"
            )
        return None
    p = Path(resume)
    if p.is_dir():
        found = list_checkpoints(p)
        if not found:
            raise CheckpointError(f"{p}: resume folder holds no checkpoints/step_*.pt")
        p = found[-1][1]
    ckpt = load_checkpoint(p)
    checkpoint_shards(p, ckpt)
    return p, ckpt
