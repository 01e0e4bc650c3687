"""Evaluation: pair verification (``.bin`` sets) and IJB-B/C template verification.

The IJB and alignment names are imported lazily (``timmface.evaluation.evaluate_ijb``), so that
importing the verification protocol stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from timmface.evaluation.verification import (
    THRESHOLDS,
    VerificationResult,
    embed_uint8,
    evaluate_bin,
    kfold_indices,
    verification_accuracy,
    verification_metrics,
)

_LAZY = {
    "evaluate_ijb": "timmface.evaluation.ijb",
    "IJBResult": "timmface.evaluation.ijb",
    "IJBProtocol": "timmface.evaluation.ijb",
    "PROTOCOLS": "timmface.evaluation.ijb",
    "make_embed_fn": "timmface.evaluation.ijb",
    "save_roc_png": "timmface.evaluation.ijb",
    "align_face": "timmface.evaluation.align",
    "estimate_similarity": "timmface.evaluation.align",
    "ARCFACE_REF_112": "timmface.evaluation.align",
}

__all__ = [
    "THRESHOLDS",
    "VerificationResult",
    "embed_uint8",
    "evaluate_bin",
    "kfold_indices",
    "verification_accuracy",
    "verification_metrics",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'timmface.evaluation' has no attribute {name!r}")
