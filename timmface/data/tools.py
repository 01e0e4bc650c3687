"""Dataset tools: pack an image folder into RecordIO, inspect any dataset (counts and a picture grid)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from timmface.data.image import decode_image_bytes, jpeg_size
from timmface.errors import CorruptRecordError, DataError


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    out = torch.nn.functional.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def check_apart(source: str | os.PathLike, out: str | os.PathLike) -> None:
    """DataError unless ``out`` and ``source`` are separate trees: the same folder, one inside the other, or the same
    through a symbolic link would make writing (and ``--overwrite``'s replacing) ``out`` touch the source."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if src == dst:
        raise DataError(f"{out}: is the same folder as the input {source}; choose an output folder outside it")
    if dst.is_relative_to(src):
        raise DataError(f"{out}: lies inside the input folder {source}; choose an output folder outside it")
    if src.is_relative_to(dst):
        raise DataError(f"{out}: holds the input folder {source}; choose an output folder outside it")


def pack_image_folder(
    image_folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    quality: int = 95,
    image_size: tuple[int, int] = (112, 112),
    resize: bool = True,
    verify: bool = True,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Pack ``image_folder/<identity>/<image>`` into an InsightFace RecordIO folder at ``out_dir``.

    JPEGs that already have ``image_size`` are copied byte for byte (``verify`` decodes them once to
    make sure they are readable). Other formats of the right size are re-encoded to JPEG at
    ``quality``. Images of another size are resized (bilinear, antialiased) and re-encoded when
    ``resize`` (one warning counts them); with ``resize=False`` the first one raises
    :class:`DataError`. Unreadable images are skipped with one warning that counts them. Labels
    follow :class:`~timmface.data.folder.ImageFolderDataset` (identity folders sorted by name).

    ``out_dir`` must lie outside ``image_folder`` (and not hold it): replacing it would delete images being packed.

    Returns counts: ``images``, ``identities``, ``copied``, ``reencoded``, ``resized``, ``skipped``.
    """
    from timmface.data.folder import ImageFolderDataset
    from timmface.data.recordio import RecordIOWriter

    check_apart(image_folder, out_dir)
    src = ImageFolderDataset(image_folder)
    size = (int(image_size[0]), int(image_size[1]))
    counts = {"copied": 0, "reencoded": 0, "resized": 0, "skipped": 0}
    first_bad: str | None = None
    with RecordIOWriter(
        out_dir, num_classes=src.num_classes, image_size=size, quality=quality, overwrite=overwrite
    ) as w:
        for i in range(len(src)):
            if progress is not None:
                progress(i, len(src))
            data, label = src.read_raw(i)
            name = str(src.keys[i])
            try:
                if jpeg_size(data) == size:
                    if verify:
                        decode_image_bytes(data, key=name, source=str(src.root))
                    w.add(data, label)
                    counts["copied"] += 1
                    continue
                img = decode_image_bytes(data, key=name, source=str(src.root))
            except CorruptRecordError:
                counts["skipped"] += 1
                first_bad = first_bad or name
                continue
            if tuple(img.shape[1:]) != size:
                if not resize:
                    raise DataError(
                        f"{src.root / name}: is {img.shape[1]}x{img.shape[2]}, expected {size[0]}x{size[1]} "
                        "(allow resizing, or align the faces first)"
                    )
                img = _resize(img, size)
                counts["resized"] += 1
            else:
                counts["reencoded"] += 1
            w.add(img, label)
    if counts["resized"]:
        warnings.warn(
            f"{src.root}: resized {counts['resized']} images to {size[0]}x{size[1]}; face crops should be aligned "
            "at this size already",
            stacklevel=2,
        )
    if counts["skipped"]:
        warnings.warn(f"{src.root}: skipped {counts['skipped']} unreadable images (first: {first_bad})", stacklevel=2)
    return {"images": len(src) - counts["skipped"], "identities": src.num_classes, **counts, "out_dir": str(out_dir)}


def open_dataset(path: str | os.PathLike) -> Any:
    """A RecordIO folder (or ``.rec`` file) or an image folder, chosen by what is on disk."""
    from timmface.data.folder import ImageFolderDataset
    from timmface.data.recordio import RecordIODataset

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such dataset")
    if p.suffix == ".rec" or (p.is_dir() and (p / "train.rec").exists()):
        return RecordIODataset(p)
    if p.is_dir():
        return ImageFolderDataset(p)
    raise DataError(f"{p}: not a RecordIO folder, an image folder or a .bin verification file")


def inspect_dataset(
    path: str | os.PathLike, grid_png: str | os.PathLike | None = None, identities: int = 8, per_identity: int = 8
) -> dict[str, Any]:
    """Counts of a dataset, and optionally a PNG grid of a few identities (one row each).

    For a RecordIO or image folder: ``images``, ``identities`` (classes), ``empty_identities``,
    ``images_per_identity`` (min/median/max over identities with images), ``image_size``, ``format``.
    For a ``.bin`` verification file: ``pairs``, ``same``, ``different``, ``images``, ``image_size``.
    """
    p = Path(path)
    if p.suffix == ".bin" and p.is_file():
        return _inspect_bin(p, grid_png, identities * per_identity)
    ds = open_dataset(p)
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    present = counts[counts > 0]
    info: dict[str, Any] = {
        "path": str(p),
        "format": "recordio" if hasattr(ds, "rec_path") else "folder",
        "images": int(len(ds)),
        "identities": int(ds.num_classes),
        "empty_identities": int((counts == 0).sum()),
        "images_per_identity": {
            "min": int(present.min()) if present.size else 0,
            "median": float(np.median(present)) if present.size else 0.0,
            "max": int(present.max()) if present.size else 0,
        },
        "image_size": list(ds.image_size),
    }
    if grid_png is not None:
        chosen = np.flatnonzero(counts)[:identities]
        rows = []
        for label in chosen:
            members = np.flatnonzero(ds.labels == label)[:per_identity]
            rows.append([_decode_or_blank(ds, int(i), info["image_size"]) for i in members])
        _write_grid(rows, per_identity, info["image_size"], Path(grid_png))
        info["grid"] = str(grid_png)
    return info


def _inspect_bin(path: Path, grid_png: str | os.PathLike | None, max_images: int) -> dict[str, Any]:
    from timmface.data.bin import VerificationSet

    vs = VerificationSet(path)
    same = int(vs.issame.sum())
    native = decode_image_bytes(vs.images[0], key=0, source=str(path)) if vs.images else None
    info: dict[str, Any] = {
        "path": str(path),
        "format": "bin",
        "pairs": len(vs),
        "same": same,
        "different": len(vs) - same,
        "images": len(vs.images),
        "image_size": list(native.shape[1:]) if native is not None else None,
    }
    if grid_png is not None and vs.images:
        n = min(len(vs.images), max_images)  # pairs side by side: 4 pairs per row
        rows = [[vs.decode(i) for i in range(start, min(start + 8, n))] for start in range(0, n, 8)]
        _write_grid(rows, 8, list(vs.image_size), Path(grid_png))
        info["grid"] = str(grid_png)
    return info


def _decode_or_blank(ds: Any, i: int, size: list[int]) -> torch.Tensor:
    try:
        img = ds.decode(i)
    except CorruptRecordError:
        return torch.zeros(3, *size, dtype=torch.uint8)
    return img if list(img.shape[1:]) == list(size) else _resize(img, (size[0], size[1]))


def _write_grid(rows: list[list[torch.Tensor]], ncol: int, size: list[int], out: Path) -> None:
    from torchvision.io import write_png
    from torchvision.utils import make_grid

    blank = torch.zeros(3, *size, dtype=torch.uint8)
    tiles = [img for row in rows for img in (row + [blank] * (ncol - len(row)))]
    if not tiles:
        raise DataError(f"{out}: nothing to draw")
    grid = make_grid(torch.stack(tiles), nrow=ncol, padding=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid, str(out))
