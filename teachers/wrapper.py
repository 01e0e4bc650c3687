"""How the trainer runs a teacher: frozen, without autograd, in a chosen precision, returning float32."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["DTYPES", "TeacherWrapper", "is_convolutional", "online_teacher", "resolve_teacher_compile"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_convolutional(module: nn.Module) -> bool:
    """A net whose work is in 2-d convolutions (iResNets, ConvNeXts, MobileNets): channels-last memory suits
    it. A ViT's single patch-embedding convolution does not count."""
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) >= 4


def _has_head(module: nn.Module) -> bool:
    """A :class:`~teachers.base.Teacher` says; a bare net splits when it has timm's two methods."""
    said = getattr(module, "has_head", None)
    if isinstance(said, bool):
        return said
    return callable(getattr(module, "forward_features", None)) and callable(getattr(module, "forward_head", None))


def resolve_teacher_compile(setting: bool | str, device: torch.device) -> bool:
    """``distill.teacher_compile``: ``auto`` compiles on CUDA (the frozen forward is a large share of a
    distillation step there) and not on a CPU, where compiling costs about a minute and gains nothing."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


class TeacherWrapper(nn.Module):
    """Run a frozen teacher: ``N x 3 x H x W`` RGB [-1, 1] (any device) -> ``N x D`` float32 on the teacher's device.

    Args:
        module: a teacher from :func:`teachers.load_teacher` (or any module with that interface).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the lower precisions run the teacher under
            ``torch.autocast`` on its device (weights stay float32); the result is float32.
        channels_last: convert the teacher and its input to channels-last memory (faster convolutions on GPUs).
        compile: run the teacher through ``torch.compile`` (compiled on first call).
        fp32_head: with a low ``dtype``, run only the trunk (:meth:`Teacher.forward_features`) under autocast
            and the embedding head (:meth:`Teacher.forward_head`: iResNet's ``fc`` + ``features``, AdaFace's
            Linear + BatchNorm1d, a timm model's ``forward_head``) in float32 on the float32 features, as
            arcface_torch's ``fp16`` iResNet does. Teachers without that split run whole under autocast.

    The forward runs under ``torch.no_grad`` rather than ``inference_mode``: inference tensors cannot be
    saved for the student's backward pass, and distillation losses use the teacher's output exactly there.
    Nothing in it reads a device value on the host, so it adds no host-device synchronisation to a step.

    Precision (CPU autocast, random weights and inputs; ``tests/test_teachers_wrapper.py`` asserts the
    iResNet-18 numbers). bf16 keeps 8 mantissa bits, so every conv, BatchNorm and residual add rounds its
    output by up to 2**-9, and the roundings add up along the depth: the min cosine to float32 is 0.999929
    (iResNet-18, seed 0) and 0.99972 (iResNet-50) with the whole net under autocast. The float32 head recovers
    only a little of it (0.999932 / 0.99973): the error is made in the trunk, where rounding only the *weights* to
    bf16 already costs 0.99998 (r18) / 0.99994 (r50). So bf16 cannot give a cosine >= 0.99999 on a deep
    teacher, head or not; float16 (10 mantissa bits) gives 0.999999 on iResNet-18 with the float32 head and
    is the faithful low-precision choice for teachers trained under fp16 autocast (arcface_torch's
    ``fp16=True``, so their activations fit fp16's range); a model not trained that way can overflow in fp16
    (random iResNet-50 gives NaN), so check first. ONNX teachers always run in float32 (onnxruntime ignores
    autocast).
    """

    def __init__(
        self,
        module: nn.Module,
        dtype: str = "float32",
        channels_last: bool = False,
        compile: bool = False,
        fp32_head: bool = True,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"teacher dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        self.teacher = module.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.dtype = DTYPES[dtype]
        self.channels_last = channels_last
        if channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        self.split_head = fp32_head and self.dtype != torch.float32 and _has_head(module)
        # kept out of the module tree, so state_dict() has no duplicate "_orig_mod." keys; a teacher without
        # parameters (an onnxruntime session) has nothing to compile
        has_weights = any(True for _ in self.teacher.parameters())
        self.compiled = bool(compile and has_weights)
        self.__dict__["_run"] = torch.compile(self._forward) if self.compiled else self._forward
        self.embed_dim: int = int(getattr(module, "embed_dim", 0))
        self.input_size: tuple[int, ...] = tuple(getattr(module, "input_size", (3, 112, 112)))
        self.teacher_info: dict[str, Any] = dict(getattr(module, "teacher_info", {}))
        super().train(False)

    def train(self, mode: bool = True) -> TeacherWrapper:
        """Stay in eval mode: ``trainer.model.train()`` must not reach the teacher's BatchNorm layers."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where the teacher's weights live (CPU for weightless teachers such as ONNX sessions)."""
        for t in (*self.teacher.parameters(), *self.teacher.buffers()):
            return t.device
        return torch.device("cpu")

    def describe(self) -> str:
        """How it runs, in a few words (for the trainer's start-up line)."""
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        parts = [f"{name} trunk + fp32 head" if self.split_head else name]
        if self.channels_last:
            parts.append("channels-last")
        parts.append("compiled" if self.compiled else "eager")
        return ", ".join(parts)

    def _forward(self, x: Tensor, device_type: str) -> Tensor:
        low = self.dtype != torch.float32
        if self.split_head:
            with torch.autocast(device_type, dtype=self.dtype):
                features = self.teacher.forward_features(x)
            with torch.autocast(device_type, enabled=False):
                return self.teacher.forward_head(features.float()).float()
        with torch.autocast(device_type, dtype=self.dtype, enabled=low):
            return self.teacher(x).float()

    def forward(self, x: Tensor) -> Tensor:
        """``N x 3 x H x W`` -> ``N x D`` float32, no autograd history."""
        device = self.device
        x = x.to(device, torch.float32, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return self._run(x, device.type)


def online_teacher(
    module: nn.Module,
    device: torch.device,
    dtype: str,
    compile: bool | str = "auto",
    student_channels_last: bool = False,
) -> TeacherWrapper:
    """The wrapper a distillation run uses on ``device``: ``compile`` resolved (``auto``: on CUDA), a
    convolutional teacher in channels-last on CUDA whatever the student's layout (cuDNN's NHWC kernels:
    iResNet-50's forward at batch 768 measured 61 ms against 82 ms NCHW in fp32, 42.5 against 60 ms in bf16),
    elsewhere the student's ``model.channels_last``; fp16 falls back to fp32 on a CPU, where fp16 convolutions
    are not implemented everywhere."""
    if device.type == "cpu" and dtype == "float16":
        dtype = "float32"
    channels_last = is_convolutional(module) if device.type == "cuda" else student_channels_last
    wrapper = TeacherWrapper(
        module, dtype=dtype, channels_last=channels_last, compile=resolve_teacher_compile(compile, device)
    )
    return wrapper.to(device)
