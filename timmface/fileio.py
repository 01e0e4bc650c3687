"""Writing files so that a reader never sees half of one, with the permissions every output gets, and replacing a
folder only when it holds nothing but a previous output of the same kind."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import BinaryIO

from timmface.errors import ConfigError, TimmfaceError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (another thread may be creating files:
    ``os.umask`` can only be read by setting it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode(folder: bool = False) -> int:
    """The permissions of a newly created file (``0o666``) or folder (``0o777``) under the user's umask: what
    ``open()`` and ``mkdir`` give. Every output gets them, also those written through ``mkstemp``/``mkdtemp``
    (which make private ``0600``/``0700`` ones) or by libraries that do (safetensors)."""
    return (0o777 if folder else 0o666) & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, hidden: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that take a file name; it becomes ``path`` when the block ends
    without an error.

    The temporary file (``.name.*.tmp`` when ``hidden``, else ``name.*.tmp``, in the same folder so the rename is
    atomic) gets :func:`output_mode` and is renamed over ``path``; on any error it is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}." if hidden else f"{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, output_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, hidden: bool = False) -> Iterator[BinaryIO]:
    """A binary file whose contents appear at ``path`` only when the block ends without an error (see
    :func:`atomic_path`)."""
    with atomic_path(path, hidden=hidden) as tmp, open(tmp, "wb") as f:
        yield f


def replaceable_folder(
    folder: str | os.PathLike,
    overwrite: bool,
    *,
    what: str,
    required: Collection[str],
    allowed: Collection[str] = (),
    flag: str = "--overwrite",
    error: type[TimmfaceError] = ConfigError,
) -> bool:
    """Whether ``folder`` exists with contents that ``overwrite`` may replace; ``error`` (one line) when it may not.

    A missing or empty folder is free (False). A non-empty one needs ``overwrite``, and then must hold a previous
    ``what``: every name in ``required`` and nothing but ``required`` and ``allowed`` (glob patterns); otherwise
    the error names what else is there, so that ``--overwrite`` can never delete a folder of other files.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise error(f"{folder}: exists and is not a folder")
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not names:
        return False
    if not overwrite:
        raise error(f"{folder}: already exists and is not empty; pass {flag} to replace it")
    foreign = [n for n in names if n not in required and not any(fnmatch.fnmatchcase(n, a) for a in allowed)]
    missing = [n for n in required if n not in names]
    if foreign or missing:
        shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
        why = f"it also holds {shown}" if foreign else f"it has no {', '.join(missing)}"
        raise error(
            f"{folder}: {flag} replaces only a folder holding a previous {what} ({', '.join(required)}); {why}. "
            "Choose another output folder, or move those files away"
        )
    return True
