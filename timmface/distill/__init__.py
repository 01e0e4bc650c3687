"""Distillation: a frozen teacher's embeddings add loss terms to the margin-loss trainer.

:class:`~timmface.distill.trainer.DistillTrainer` is the ordinary :class:`~timmface.trainer.Trainer` with its
hooks filled in; the training loop itself is not forked. The teacher's embeddings of exactly the images the
student sees come **online** (the frozen teacher on the flipped, normalised batch, under ``no_grad``, outside
DDP) or **cached** (rows of a ``timmface embed --cache`` file, original or mirrored view by the sample's flip
bit, so a step costs no teacher forward). Cached targets pair a record with its teacher embedding, so any
augmentation other than the flip would distil towards the embedding of a different image: the trainer refuses
that combination.

The methods, each a config key (``distill.*``) and each combinable with the others and with every margin loss:

- :mod:`~timmface.distill.terms`: feature KD (``1 - cos`` / MSE, a learned projection between sizes);
  relation KD over similarity rows (MSE / KL) in the batch or against the teacher memory; EKD (evaluation-
  oriented KD, CVPR 2022): a rank loss on the pairs that decide TPR/FPR at each model's own thresholds;
  logit KD over the class centres (:func:`~timmface.distill.terms.logit_kl`). Their similarities, softmaxes
  and KLs run in float32 under AMP.
- :mod:`~timmface.distill.centres`: the teacher's class centres (per-identity means), AdaDistill's per-sample
  centre update before the logits (:func:`~timmface.distill.centres.adadistill_update_`, ECCV 2024) and the
  margin head's hook that applies it and logit KD (:class:`~timmface.distill.centres.HeadDistillation`).
- :mod:`~timmface.distill.memory`: the cross-batch FIFO of teacher embeddings the relation terms compare with.

Names are resolved lazily: ``import timmface.distill`` does not build the trainer's imports.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DistillTrainer": "timmface.distill.trainer",
    "HeadDistillation": "timmface.distill.centres",
    "adadistill_update_": "timmface.distill.centres",
    "compute_teacher_centres": "timmface.distill.centres",
    "ema_update_": "timmface.distill.centres",
    "occurrence_index": "timmface.distill.centres",
    "TeacherMemory": "timmface.distill.memory",
    "EKD_ANCHORS": "timmface.distill.terms",
    "EvaluationOrientedDistillation": "timmface.distill.terms",
    "FeatureDistillation": "timmface.distill.terms",
    "RelationDistillation": "timmface.distill.terms",
    "ekd_loss": "timmface.distill.terms",
    "ekd_soft_rank": "timmface.distill.terms",
    "in_batch_pairs": "timmface.distill.terms",
    "logit_kl": "timmface.distill.terms",
    "memory_pairs": "timmface.distill.terms",
    "similarity_kl": "timmface.distill.terms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'timmface.distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
