"""Evaluation: pair verification (``.bin`` sets) and IJB-B/C template verification."""

from timmface.evaluation.verification import (
    THRESHOLDS,
    VerificationResult,
    embed_uint8,
    evaluate_bin,
    kfold_indices,
    verification_accuracy,
    verification_metrics,
)

__all__ = [
    "THRESHOLDS",
    "VerificationResult",
    "embed_uint8",
    "evaluate_bin",
    "kfold_indices",
    "verification_accuracy",
    "verification_metrics",
]
