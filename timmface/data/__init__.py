"""Datasets and loaders: InsightFace RecordIO, image folders, verification ``.bin`` files, demo data.

Imports flow one way: :mod:`~timmface.data.image` (every decoder) <- the formats (:mod:`~timmface.data.recordio`,
:mod:`~timmface.data.folder`, :mod:`~timmface.data.bin`) and :mod:`~timmface.data.batch` (the micro-batch from
worker to device) <- :mod:`~timmface.data.gpu_decode` <- :mod:`~timmface.data.wds` (streamed shards) <-
:mod:`~timmface.data.loader` (format dispatch, sampling, the training loader). :mod:`~timmface.data.transforms`
builds augmentations; :mod:`~timmface.data.demo` generates the demo set; :mod:`~timmface.data.tools` backs
``timmface data``.

Names are resolved lazily so that importing :mod:`timmface.data` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RecordIODataset": "timmface.data.recordio",
    "RecordIOWriter": "timmface.data.recordio",
    "ImageFolderDataset": "timmface.data.folder",
    "read_bin": "timmface.data.bin",
    "write_bin": "timmface.data.bin",
    "build_transform": "timmface.data.transforms",
    "build_train_loader": "timmface.data.loader",
    "DeviceNormalizer": "timmface.data.batch",
    "build_dataset": "timmface.data.loader",
    "generate_demo_dataset": "timmface.data.demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'timmface.data' has no attribute {name!r}")
