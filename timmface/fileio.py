"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, hidden: bool = False) -> Iterator[BinaryIO]:
    """A binary file whose contents appear at ``path`` only when the block ends without an error.

    The data goes to a temporary file in the same folder (``.name.*.tmp`` when ``hidden``, else
    ``name.*.tmp``), made readable by all (mkstemp makes 0600 files; others may share the data folder) and
    renamed over ``path``; on any error, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}." if hidden else f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
