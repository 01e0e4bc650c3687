"""Frozen teacher models loaded from the checkpoint formats people download.

``load_teacher(path)`` reads an insightface iResNet state dict, an AdaFace IR Lightning checkpoint, a
timm hub folder, a timmface checkpoint or run directory, or an insightface ONNX model, and returns a
:class:`Teacher`: an eval-mode module with no trainable parameter that maps our RGB [-1, 1] batch
``N x 3 x 112 x 112`` to the teacher's unnormalised ``N x D`` embedding. :class:`TeacherWrapper` runs it
for the trainer (no autograd, chosen precision; :func:`online_teacher` picks layout and compilation
for a device); :func:`teacher_fingerprint` ties caches to its weights.
"""

from __future__ import annotations

from .base import Teacher
from .detect import SUPPORTED_FORMATS, ArchSpec, detect_architecture
from .load import load_teacher, teacher_files, teacher_fingerprint
from .wrapper import TeacherWrapper, online_teacher

__all__ = [
    "SUPPORTED_FORMATS",
    "ArchSpec",
    "Teacher",
    "TeacherWrapper",
    "detect_architecture",
    "load_teacher",
    "online_teacher",
    "teacher_files",
    "teacher_fingerprint",
]
