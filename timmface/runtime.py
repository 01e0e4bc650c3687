"""Where and how a run executes: the device, seeding and the RNG state a resume restores, ``torch.compile``.

Shared by the trainer, ``timmface eval`` and ``timmface embed``; nothing here knows about models or data.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from timmface.errors import ConfigError

__all__ = ["compile_module", "pick_device", "rng_state", "seed_everything", "set_rng_state"]


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def compile_module(module: nn.Module, fullgraph: bool = True, name: str = "model", **kwargs: Any) -> None:
    """``module.compile(fullgraph=...)`` in place (state-dict keys keep no ``_orig_mod.``).

    With ``fullgraph``, a model that cannot be traced as one graph (dynamo raises on its first call)
    is compiled again with graph breaks allowed, after one warning line. The fallback sits inside the
    module's own call, so a surrounding DDP forward never sees the failure.
    """
    from torch._dynamo.exc import Unsupported, UserError

    module.compile(fullgraph=fullgraph, **kwargs)
    if not fullgraph:
        return
    strict = module._compiled_call_impl  # what Module.compile installed; replaced below on failure

    def call_or_fall_back(*args: Any, **kw: Any) -> Any:
        try:
            return strict(*args, **kw)
        except (Unsupported, UserError) as e:
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
            print(f"warning: compile: {name} is not one graph ({first}); compiling with graph breaks", flush=True)
            module.compile(fullgraph=False, **kwargs)
            return module._compiled_call_impl(*args, **kw)

    module._compiled_call_impl = call_or_fall_back


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
