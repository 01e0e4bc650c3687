"""Plain embedding files for other tools: ``.safetensors``, or ``.npy`` with ``.keys.txt`` (+ ``.labels.npy``).

:func:`write_embeddings` writes ``(N, D)`` embeddings with their record keys (RecordIO keys as int64, file paths
as UTF-8) and labels; :func:`read_embeddings` reads either format back. Each file appears atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from timmface.embedding.cache import FORMAT
from timmface.errors import DataError
from timmface.fileio import atomic_path

__all__ = ["read_embeddings", "write_embeddings"]


def _int_keys(keys: np.ndarray) -> bool:
    return keys.dtype.kind in "iu"


def write_embeddings(
    out: str | Path,
    embeddings: np.ndarray,
    keys: np.ndarray,
    labels: np.ndarray | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``embeddings`` (N, D) with their ``keys`` (and ``labels``) to ``out``; returns the files written.

    ``.safetensors``: tensors ``embeddings``, ``keys`` (int64, for RecordIO keys) or ``keys_utf8`` + ``keys_offsets``
    (UTF-8 bytes of path keys and their N + 1 offsets), ``labels`` when known; ``metadata`` as its string metadata.
    ``.npy``: the array; keys in ``<stem>.keys.txt`` (one per line), labels in ``<stem>.labels.npy``.
    Each file is written under a temporary name and renamed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = np.asarray(keys)
    written: list[Path] = []

    def atomic(path: Path, write: Callable[[Path], None]) -> None:
        with atomic_path(path, hidden=True) as tmp:  # (safetensors would create it 0600; outputs get the usual mode)
            write(tmp)
        written.append(path)

    if out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {"embeddings": np.ascontiguousarray(embeddings)}
        if _int_keys(keys):
            tensors["keys"] = keys.astype(np.int64)
        else:
            encoded = [str(k).encode("utf-8", "surrogateescape") for k in keys]
            tensors["keys_utf8"] = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
            tensors["keys_offsets"] = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
        if labels is not None:
            tensors["labels"] = np.asarray(labels, dtype=np.int64)
        meta = {"format": FORMAT, "keys": "int64" if _int_keys(keys) else "utf8", **(metadata or {})}
        atomic(out, lambda p: save_file(tensors, str(p), metadata=meta))
    elif out.suffix == ".npy":
        if any("\n" in str(k) for k in keys.tolist()):
            raise DataError(f"{out}: a key holds a newline; write .safetensors instead")
        text = "".join(f"{k}\n" for k in keys.tolist())
        atomic(out, lambda p: _save_npy(p, embeddings))
        atomic(out.with_name(out.stem + ".keys.txt"), lambda p: p.write_text(text, encoding="utf-8"))
        if labels is not None:
            atomic(out.with_name(out.stem + ".labels.npy"), lambda p: _save_npy(p, np.asarray(labels, dtype=np.int64)))
    else:
        raise DataError(f"{out}: unknown output format '{out.suffix}' (use .safetensors, .npy or .tfemb)")
    return written


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(keys, embeddings (N, D), labels or None)`` from a file written by :func:`write_embeddings`.

    Keys are int64 for RecordIO records, else an object array of strings.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        t = load_file(str(path))
        if "keys" in t:
            keys = t["keys"]
        else:
            raw, offs = t["keys_utf8"].tobytes(), t["keys_offsets"]
            keys = np.array(
                [raw[offs[i] : offs[i + 1]].decode("utf-8", "surrogateescape") for i in range(len(offs) - 1)],
                dtype=object,
            )
        return keys, t["embeddings"], t.get("labels")
    if path.suffix == ".npy":
        emb = np.load(path, allow_pickle=False)
        lines = path.with_name(path.stem + ".keys.txt").read_text(encoding="utf-8").splitlines()
        keys = np.array(lines, dtype=object)
        if lines and all(k.lstrip("-").isdigit() for k in lines):
            keys = keys.astype(np.int64)
        labels_path = path.with_name(path.stem + ".labels.npy")
        labels = np.load(labels_path, allow_pickle=False) if labels_path.exists() else None
        return keys, emb, labels
    raise DataError(f"{path}: unknown embedding file format '{path.suffix}'")
