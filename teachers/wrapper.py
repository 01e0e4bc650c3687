"""How the trainer runs a teacher: frozen, without autograd, in a chosen precision, returning float32."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["DTYPES", "TeacherWrapper"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherWrapper(nn.Module):
    """Run a frozen teacher: ``N x 3 x H x W`` RGB [-1, 1] (any device) -> ``N x D`` float32 on the teacher's device.

    Args:
        module: a teacher from :func:`teachers.load_teacher` (or any module with that interface).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the lower precisions run the teacher under
            ``torch.autocast`` on its device (weights stay float32; convolutions and matmuls run in the
            low precision; the result is cast back to float32).
        channels_last: convert the teacher and its input to channels-last memory (faster convolutions on GPUs).
        compile: run the teacher through ``torch.compile`` (compiled on first call).

    The forward runs under ``torch.no_grad`` rather than ``inference_mode``: inference tensors cannot be
    saved for the student's backward pass, and distillation losses use the teacher's output exactly there.

    Precision (measured with CPU autocast on random weights and inputs; ``tests/test_teachers_wrapper.py``
    asserts the iResNet-18 numbers). bf16 keeps 8 mantissa bits, so every conv, BatchNorm and residual
    add rounds its output by up to 2**-9, and the roundings add up along the depth. The embedding's
    relative error is ~1.3% for iResNet-18: min cosine to float32 0.99990-0.99993 over seeds (one seed
    of another init gave 0.99989), i.e. *at* the 0.9999 mark, not safely above it; iResNet-50 is ~2%
    (0.9997-0.9998). Random BatchNorm statistics are not the cause: re-estimating them on the inputs,
    as training would, gives the same cosine; keeping conv outputs in float32 barely helps (0.99992);
    rounding only the weights to bf16 already costs 0.99998 (r18) / 0.99994 (r50). So for a deep
    trained teacher in bf16 expect cosine ~0.9998, not a guaranteed >= 0.9999 (not measurable here
    without trained weights) -- a gap far smaller than any student's distance to its teacher, but not
    bit-faithful. float16 (10 mantissa bits) gives 0.999998 on iResNet-18 and is the faithful
    low-precision choice for teachers trained under fp16 autocast (arcface_torch's ``fp16=True``, so
    their activations fit fp16's range); a model not trained that way can overflow in fp16 (random
    iResNet-50 gives NaN), so check first.
    ONNX teachers always run in float32 (onnxruntime ignores autocast).
    """

    def __init__(
        self, module: nn.Module, dtype: str = "float32", channels_last: bool = False, compile: bool = False
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
        # kept out of the module tree, so state_dict() has no duplicate "_orig_mod." keys; a teacher without
        # parameters (an onnxruntime session) has nothing to compile
        has_weights = any(True for _ in self.teacher.parameters())
        self.__dict__["_run"] = torch.compile(self.teacher) if compile and has_weights else self.teacher
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

    def forward(self, x: Tensor) -> Tensor:
        """``N x 3 x H x W`` -> ``N x D`` float32, no autograd history."""
        device = self.device
        x = x.to(device, torch.float32, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        low = self.dtype != torch.float32
        with torch.no_grad(), torch.autocast(device.type, dtype=self.dtype, enabled=low):
            out = self._run(x)
        return out.float()
