"""Embedding a whole dataset with a model, in batches, into an embedding file that a re-run completes.

* :func:`embed_batch`: uint8 images -> float32 ``(N, V, D)``, one column per view (the image, its mirror, or
  their sum), on the trainer's exact input (:func:`~timmface.data.batch.normalize_on_device`).
* :func:`fill_embeddings`: creates (or reopens) a ``.tfemb`` file (:mod:`timmface.embedding.cache`) and computes
  every row not yet written, with DataLoader workers reading and decoding, a progress bar or plain progress lines,
  and records that fail to decode left out (reported, ``done = 0``).
* The two things ``timmface embed`` makes with it: :func:`build_cache` (the float16 teacher cache that distillation
  reads) and :func:`embed_to_file` (a ``.safetensors`` / ``.npy`` file, :mod:`timmface.embedding.files`, that
  accumulates in a ``.partial`` embedding file first).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from timmface.data.batch import normalize_on_device
from timmface.data.image import resize_uint8
from timmface.embedding.cache import (
    CACHE_VIEWS,
    DTYPES,
    SUM_VIEW,
    EmbeddingCache,
    RowWriter,
    create_file,
    dataset_fingerprint,
    read_header,
)
from timmface.embedding.files import write_embeddings
from timmface.errors import CorruptRecordError, DataError
from timmface.progress import CountProgress

__all__ = ["FillReport", "build_cache", "embed_batch", "embed_to_file", "fill_embeddings"]


# --------------------------------------------------------------------------------------------------
# Reading the images
# --------------------------------------------------------------------------------------------------


class _Items(Dataset):
    """``i`` -> ``(i, uint8 image at image_size, None)``, or ``(i, None, (key, message))`` for a corrupt record."""

    def __init__(self, base: Dataset, image_size: int) -> None:
        self.base, self.image_size = base, image_size

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, tuple[Any, str] | None]:
        try:
            image = self.base[i][0]
        except CorruptRecordError as e:
            return i, None, (e.key if e.key is not None else i, str(e))
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = resize_uint8(image, self.image_size)
        return i, image, None


def _collate(
    items: list[tuple[int, Tensor | None, Any]],
) -> tuple[np.ndarray, Tensor | None, list[tuple[int, Any, str]]]:
    good = [(i, img) for i, img, _ in items if img is not None]
    bad = [(i, b[0], b[1]) for i, img, b in items if img is None]
    indices = np.array([i for i, _ in good], dtype=np.int64)
    images = torch.stack([img for _, img in good]) if good else None
    return indices, images, bad


def _batches(
    dataset: Dataset, indices: np.ndarray, image_size: int, batch_size: int, num_workers: int
) -> Iterator[tuple[np.ndarray, Tensor | None, list[tuple[int, Any, str]]]]:
    batches = [indices[s : s + batch_size].tolist() for s in range(0, len(indices), batch_size)]
    workers = max(0, min(num_workers, len(batches) - 1))  # no worker processes for a single batch
    loader = DataLoader(
        _Items(dataset, image_size),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
        **({"prefetch_factor": 4} if workers else {}),
    )
    yield from loader


# --------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def embed_batch(
    model: nn.Module,
    images: Tensor,
    views: Sequence[str] = CACHE_VIEWS,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> Tensor:
    """float32 ``(N, V, D)`` embeddings of uint8 ``N x 3 x H x W`` RGB images, one column per view.

    Views: ``"original"`` = ``model(x)``, ``"hflip"`` = ``model(torch.flip(x, dims=[3]))``, ``"original+hflip"`` =
    their sum, where ``x`` is the trainer's [-1, 1] input (:func:`~timmface.data.batch.normalize_on_device`).
    """
    device = torch.device(device)
    x = normalize_on_device(images.to(device, non_blocking=True), None)
    out: dict[str, Tensor] = {}

    def run(name: str, inp: Tensor) -> Tensor:
        if name not in out:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out[name] = model(inp).float()
        return out[name]

    cols = []
    for view in views:
        if view == "original":
            cols.append(run("original", x))
        elif view == "hflip":
            cols.append(run("hflip", torch.flip(x, dims=[3])))
        elif view == SUM_VIEW:
            cols.append(run("original", x) + run("hflip", torch.flip(x, dims=[3])))
        else:
            raise ValueError(f"unknown view {view!r}")
    return torch.stack(cols, dim=1)


def _probe_dim(model: nn.Module, image_size: int, device: torch.device) -> int:
    """The embedding size, from one forward of a grey image (a timm ViT's ``embed_dim`` is its width, not this)."""
    with torch.no_grad():
        y = model(torch.zeros(1, 3, image_size, image_size, device=device))
    if y.ndim != 2:
        raise DataError(f"the model returned shape {tuple(y.shape)} for one image; expected 1 x D")
    return int(y.shape[1])


@dataclass
class FillReport:
    """What one :func:`fill_embeddings` call did."""

    path: Path
    num_records: int
    written: int = 0
    """Rows computed by this call."""
    skipped: int = 0
    """Rows already done when the call started (a resumed run)."""
    bad: list[tuple[int, Any, str]] = field(default_factory=list)
    """``(index, key, message)`` of the records that failed to decode in this call."""
    seconds: float = 0.0


def _checked_rows(rows: Tensor, dtype: str, indices: np.ndarray, out: Path) -> np.ndarray:
    """``rows`` in the file's dtype; DataError if a value is not finite there (float16 overflows above 65504)."""
    arr = rows.cpu().numpy().astype(DTYPES[dtype])
    bad = ~np.isfinite(arr).reshape(len(arr), -1).all(1)
    if bad.any():
        raise DataError(
            f"{out}: the model's embedding of record {int(indices[np.argmax(bad)])} is not finite in {dtype} "
            f"(max |value| {float(rows.abs().max()):.3g}); check the model (or its --amp precision)"
        )
    return arr


def _open_or_create(
    out: Path, meta: dict[str, Any], num_records: int, dim: int, views: Sequence[str], dtype: str, resume: bool
) -> dict[str, Any]:
    """The header of ``out``: the existing file's when it matches the request and ``resume``, else a new file's."""
    if resume and out.exists():
        try:
            old = read_header(out)
        except DataError as e:
            raise DataError(f"{e}; pass --overwrite to replace it, or choose another --out") from None
        want = {
            "num_records": num_records,
            "dim": dim,
            "views": list(views),
            "dtype": dtype,
            "image_size": meta.get("image_size"),
            "dataset fingerprint": (meta.get("dataset") or {}).get("fingerprint"),
            "teacher fingerprint": (meta.get("teacher") or {}).get("fingerprint"),
        }
        have = {
            **{k: old.get(k) for k in ("num_records", "dim", "views", "dtype", "image_size")},
            "dataset fingerprint": (old.get("dataset") or {}).get("fingerprint"),
            "teacher fingerprint": (old.get("teacher") or {}).get("fingerprint"),
        }
        diff = [f"{k} {have[k]!r} (file) != {want[k]!r} (now)" for k in want if have[k] != want[k]]
        if diff:
            raise DataError(
                f"{out}: exists and was written for something else ({'; '.join(diff[:3])}); "
                "pass --overwrite to replace it, or choose another --out"
            )
        return old
    return create_file(out, meta, num_records, dim, views, dtype)


def fill_embeddings(
    model: nn.Module,
    dataset: Dataset,
    out: str | Path,
    *,
    meta: dict[str, Any],
    views: Sequence[str] = CACHE_VIEWS,
    dtype: str = "float16",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 4,
    image_size: int = 112,
    progress: bool = True,
    resume: bool = True,
    label: str = "embed",
) -> FillReport:
    """Create (or reopen, with ``resume``) the embedding file ``out`` and compute every row whose ``done`` is 0.

    ``meta`` goes into the header (``dataset``, ``teacher``, ... ; ``image_size`` and ``created`` are added). An
    existing file whose header does not match (records, dim, views, dtype, image size, dataset or teacher
    fingerprint) is refused with a DataError; ``resume=False`` replaces it.
    """
    out = Path(out)
    t0 = time.perf_counter()
    dev = _device_of(model, device)
    model = model.to(dev).eval()
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError(f"{out}: the dataset is empty")
    dim = _probe_dim(model, image_size, dev)
    meta = {**meta, "image_size": int(image_size), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    header = _open_or_create(out, meta, n, dim, views, dtype, resume)
    with EmbeddingCache(out, header) as existing:
        todo = existing.missing()
    report = FillReport(out, n, skipped=n - len(todo))
    writer = RowWriter(out, header)
    bar = CountProgress(label, n, n - len(todo), enabled=progress and len(todo) > 0)
    try:
        for indices, images, bad in _batches(dataset, todo, image_size, batch_size, num_workers):
            report.bad.extend(bad)
            if images is not None:
                rows = embed_batch(model, images, views, dev, amp_dtype)
                if rows.shape[1:] != (len(views), dim):
                    raise DataError(
                        f"the model returned rows of shape {tuple(rows.shape[1:])}, expected {(len(views), dim)}"
                    )
                writer.write(indices, _checked_rows(rows, dtype, indices, out))
                report.written += len(indices)
            bar.update(len(indices) + len(bad))
    finally:
        bar.close()
        writer.close()
        report.seconds = time.perf_counter() - t0
    return report


def build_cache(
    model: nn.Module,
    dataset: Dataset,
    out: str | Path,
    *,
    teacher_path: str = "",
    teacher_fingerprint: str = "",
    teacher_info: dict | None = None,
    dataset_path: str = "",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 4,
    image_size: int = 112,
    progress: bool = True,
    resume: bool = True,
) -> Path:
    """Write the teacher-embedding cache of ``dataset``: float16 ``(N, 2, D)`` (image, mirrored image) + ``done``.

    With ``resume`` an existing cache for the same dataset and teacher is completed (only rows with ``done == 0`` are
    computed); one for another dataset or teacher is refused (DataError). ``resume=False`` starts a new file.
    Records that fail to decode stay missing (``done = 0``): :meth:`EmbeddingCache.missing` lists them (``timmface
    embed`` prints their keys).
    """
    meta = {
        "dataset": {
            "path": str(dataset_path or getattr(dataset, "root", "") or ""),
            "fingerprint": dataset_fingerprint(dataset),
            "num_records": len(dataset),  # type: ignore[arg-type]
            "num_classes": int(getattr(dataset, "num_classes", 0) or 0),
        },
        "teacher": {
            "path": str(teacher_path),
            "fingerprint": str(teacher_fingerprint),
            "info": dict(teacher_info or {}),
        },
    }
    fill_embeddings(
        model, dataset, out, meta=meta, views=CACHE_VIEWS, dtype="float16", batch_size=batch_size, device=device,
        amp_dtype=amp_dtype, num_workers=num_workers, image_size=image_size, progress=progress, resume=resume,
        label="teacher cache",
    )  # fmt: skip
    return Path(out)


# --------------------------------------------------------------------------------------------------
# Plain embedding files
# --------------------------------------------------------------------------------------------------


def nothing_read(report: FillReport) -> str:
    """``0 of N images could be read (first: KEY: why)``, for a run that embedded nothing."""
    first = ""
    if report.bad:
        _, key, why = report.bad[0]
        first = f" (first: {key}: {why})"
    return f"0 of {report.num_records} images could be read{first}"


def embed_to_file(
    model: nn.Module,
    dataset: Dataset,
    out: str | Path,
    *,
    meta: dict[str, Any],
    flip: bool = False,
    normalize: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 4,
    image_size: int = 112,
    progress: bool = True,
) -> tuple[FillReport, list[Path], np.ndarray]:
    """Embed every image of ``dataset`` into ``out`` (``.safetensors`` / ``.npy``), resumably.

    Rows accumulate in ``<out>.partial`` (a float32 embedding file, see the module docstring): an interrupted run
    continues from it, computing only the rows not yet written; it is converted to ``out`` and deleted at the end.
    ``flip`` stores ``f(x) + f(flip(x))``; ``normalize`` L2-normalises. Records that fail to decode are left out.

    Returns the fill report, the files written and the indices of the records left out.
    """
    out = Path(out)
    if out.suffix not in (".safetensors", ".npy"):
        raise DataError(f"{out}: unknown output format '{out.suffix}' (use .safetensors, .npy or .tfemb)")
    partial = out.with_name(out.name + ".partial")
    if overwrite:
        partial.unlink(missing_ok=True)
    elif out.exists() and not partial.exists():
        raise DataError(f"{out}: already exists; pass --overwrite to replace it")
    report = fill_embeddings(
        model, dataset, partial, meta=meta, views=[SUM_VIEW] if flip else ["original"], dtype="float32",
        batch_size=batch_size, device=device, amp_dtype=amp_dtype, num_workers=num_workers, image_size=image_size,
        progress=progress, resume=not overwrite,
    )  # fmt: skip
    with EmbeddingCache.open(partial) as store:
        done = np.flatnonzero(store.done)
        missing = store.missing()
        emb = store.rows(done)[:, 0].astype(np.float32)
    if not len(done):  # an empty file would look like a result: say so, and leave nothing behind
        partial.unlink(missing_ok=True)
        raise DataError(f"{out}: nothing written: {nothing_read(report)}")
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    keys = np.asarray(getattr(dataset, "keys", np.arange(len(dataset))))  # type: ignore[arg-type]
    labels = getattr(dataset, "labels", None)
    labels = np.asarray(labels)[done] if labels is not None and int(getattr(dataset, "num_classes", 0) or 0) else None
    info = {
        "model": str((meta.get("teacher") or {}).get("path", "")),
        "model_fingerprint": str((meta.get("teacher") or {}).get("fingerprint", "")),
        "dataset_fingerprint": str((meta.get("dataset") or {}).get("fingerprint", "")),
        "views": SUM_VIEW if flip else "original",
        "normalized": str(normalize).lower(),
        "image_size": str(image_size),
        "num_missing": str(len(missing)),
    }
    files = write_embeddings(out, emb.astype(DTYPES[dtype]), keys[done], labels, info)
    partial.unlink(missing_ok=True)
    return report, files, missing
