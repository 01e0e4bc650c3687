"""Loose image files as datasets with the interface of RecordIO: ``root/<identity>/<image>`` folders
(:class:`ImageFolderDataset`, for training) and unlabelled lists of files (:class:`FileListDataset`, for
``timmface embed``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from timmface.data.image import decode_image_bytes
from timmface.errors import CorruptRecordError, DataError

# What torchvision.io.decode_image reads; anything else (BMP, TIFF, text, ...) is skipped.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif"})


def _list_images(folder: Path) -> tuple[list[str], int]:
    """Image paths under ``folder`` (recursively, sorted, hidden entries ignored) and the number of
    other files skipped."""
    images: list[str] = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                images.append(os.path.join(dirpath, name))
            else:
                skipped += 1
    return images, skipped


class ImageFolderDataset(Dataset):
    """A folder of identity folders: ``root/<identity>/<image>`` (images may sit in subfolders).

    Identities are sorted by name and numbered 0..C-1. Items are ``(image, label)`` like
    :class:`~timmface.data.recordio.RecordIODataset`: a ``uint8`` RGB tensor (3, H, W) (or the
    transform's output) and a python ``int``.

    Files that are not images (by extension, see :data:`IMAGE_EXTENSIONS`) are skipped with one
    warning that counts them. An identity folder without any image is skipped too (one warning that
    counts them) and gets **no label**: labels stay contiguous over the identities that have images,
    so a half-copied folder still trains; ``classes`` gives the identity name of every label.

    Attributes:
        root: the folder.
        classes: identity folder names, index = label.
        keys: object array of image paths relative to ``root`` (POSIX separators), dataset order.
        labels: int64 array, one per image.
        num_classes: ``len(classes)``.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such image folder")
        classes: list[str] = []
        paths: list[str] = []
        labels: list[int] = []
        empty: list[str] = []
        skipped = 0
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                skipped += 1  # a loose file at the top level belongs to no identity
                continue
            images, n_skipped = _list_images(Path(entry.path))
            skipped += n_skipped
            if not images:
                empty.append(entry.name)
                continue
            label = len(classes)
            classes.append(entry.name)
            paths.extend(Path(p).relative_to(self.root).as_posix() for p in images)
            labels.extend([label] * len(images))
        if skipped:
            warnings.warn(f"{self.root}: skipped {skipped} files that are not images", stacklevel=2)
        if empty:
            warnings.warn(
                f"{self.root}: {len(empty)} identity folders have no images and get no label (first: {empty[0]!r})",
                stacklevel=2,
            )
        if not paths:
            raise DataError(f"{self.root}: no images found (expected root/<identity>/<image>)")
        self.classes = classes
        self.keys = np.array(paths, dtype=object)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(classes)
        self._image_size: tuple[int, int] | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the first image (the folder is assumed uniform)."""
        if self._image_size is None:
            img = self.decode(0)
            self._image_size = (int(img.shape[1]), int(img.shape[2]))
        return self._image_size

    def read_raw(self, i: int) -> tuple[bytes, int]:
        """``(file bytes, label)`` of item ``i``, without decoding."""
        path = self.root / self.keys[i]
        try:
            return path.read_bytes(), int(self.labels[i])
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None

    def decode(self, i: int) -> torch.Tensor:
        """Item ``i`` as a ``uint8`` RGB tensor (3, H, W), without the transform."""
        data, _ = self.read_raw(i)
        return decode_image_bytes(data, key=str(self.keys[i]), source=str(self.root))

    def __getitem__(self, i: int) -> tuple[Any, int]:
        data, label = self.read_raw(i)
        image = decode_image_bytes(data, key=str(self.keys[i]), source=str(self.root))
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, images={len(self)}, num_classes={self.num_classes})"


class FileListDataset(Dataset):
    """Image files given by path: items ``(uint8 CHW RGB, -1)``; ``keys`` are the paths as given."""

    def __init__(self, files: Sequence[str | os.PathLike], keys: Sequence[str] | None = None) -> None:
        self.files = [str(f) for f in files]
        self.keys = np.array([str(k) for k in (keys if keys is not None else self.files)], dtype=object)
        self.labels = np.full(len(self.files), -1, dtype=np.int64)
        self.num_classes = 0
        if not self.files:
            raise DataError("no image files given")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.files[i]
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise CorruptRecordError(f"{path}: cannot read ({e.strerror})", key=str(self.keys[i])) from None
        return decode_image_bytes(data, key=str(self.keys[i]), source=path), -1
