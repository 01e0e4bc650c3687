"""Which autocast dtype a run uses: ``amp: auto | bfloat16 | float16 | none``.

``auto`` picks bf16 where it is fast and fp32 where it is not:

* **CUDA**: bf16 on GPUs with native bf16 (Ampere and newer); float16 (with a grad scaler) on older
  ones, where bf16 is emulated.
* **CPU**: bf16 only when the CPU has bf16 matrix instructions: AMX-BF16 (Intel Sapphire Rapids and
  newer) or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and newer); else fp32. Without them oneDNN
  emulates bf16 with conversions around fp32 arithmetic: a ``lcnet_050`` training step at batch 64 took
  7.7x *longer* in bf16 than in fp32 on an AVX2-only AMD EPYC (Zen 3), while on an AMX CPU the same step
  was reported 4.1x faster (issue 13). ``benchmarks/train_step.py`` prints both on the machine it runs on.

Detection: PyTorch's own CPU probes (``torch.cpu._is_amx_tile_supported`` /
``_is_avx512_bf16_supported``, which also check that the operating system enables the registers),
else the ``flags`` of ``/proc/cpuinfo`` (``amx_bf16``, ``avx512_bf16``). ARM CPUs get fp32: their bf16
instructions (``BFMMLA``) have not been measured here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["AMP_DTYPES", "cpu_bf16_units", "resolve_amp"]

AMP_DTYPES: dict[str, torch.dtype | None] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}


@functools.cache
def _probe_cpu() -> str | None:
    probes = (("AMX-BF16", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    found_probe = False
    for name, attr in probes:
        probe = getattr(torch.cpu, attr, None)
        if probe is None:
            continue
        found_probe = True
        try:
            if probe():
                return name
        except RuntimeError:
            continue
    if found_probe:
        return None
    try:  # an older torch without the probes: the kernel's view of the CPU
        return cpu_bf16_units(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def cpu_bf16_units(cpuinfo: str | None = None) -> str | None:
    """The CPU's bf16 matrix unit, ``"AMX-BF16"`` or ``"AVX512-BF16"``, or ``None`` (fp32 is faster there).

    ``cpuinfo``: the text of ``/proc/cpuinfo`` to read the ``flags`` from; ``None`` asks this machine.
    """
    if cpuinfo is None:
        return _probe_cpu()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def _cuda_native_bf16() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch without the keyword (before 2.4): its answer was the native one
        return bool(torch.cuda.is_bf16_supported())
    except Exception:  # no device to ask (a config resolved on a machine without CUDA)
        return True


def resolve_amp(name: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for ``amp=name`` on ``device`` (``None`` = fp32), and a few words saying why."""
    if name != "auto":
        return AMP_DTYPES[name], name
    if device.type == "cuda":
        if _cuda_native_bf16():
            return torch.bfloat16, "auto: CUDA"
        return torch.float16, "auto: this GPU has no native bf16"
    if device.type == "cpu":
        unit = cpu_bf16_units()
        if unit is not None:
            return torch.bfloat16, f"auto: the CPU has {unit}"
        return None, "auto: the CPU has no bf16 matrix units (AMX-BF16, AVX512-BF16)"
    return None, f"auto: fp32 on {device.type}"
