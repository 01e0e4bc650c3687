"""Reading teacher files without running code from them, and strict weight loading with one-line errors."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from timmface.errors import TeacherError

from .detect import format_keys

__all__ = ["first_line", "load_weights", "safe_torch_load", "read_safetensors"]

# messages of torch's weights-only unpickler when a pickle asks for something beyond plain data
_REFUSED = (
    "Unsupported global",
    "unsupported GLOBAL",
    "Trying to call reduce",
    "Can only create new object",
    "Can only build",
)


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (errors here are one line)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


class LightningAttributeDict(dict):
    """Inert stand-in for Lightning's ``AttributeDict`` (the ``hyper_parameters`` of a ``.ckpt``).

    ``torch.load`` builds it with ``cls.__new__(cls)`` and then fills it with SETITEMS, which the weights-only
    unpickler allows on plain dicts only; so ``__new__`` returns a plain (empty) ``dict``: no code of the
    file's choosing runs, and the hyper-parameters come back as data.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> dict:  # type: ignore[misc]
        return {}


class ArgparseNamespace:
    """Inert stand-in for ``argparse.Namespace`` (AdaFace keeps its command-line arguments in the ``.ckpt``):
    the pickled attributes are stored as they are, nothing else happens."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})

    def __repr__(self) -> str:
        return f"Namespace({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


# Exactly these names (what released Lightning checkpoints, AdaFace's among them, pickle) map to the inert
# stand-ins above through torch's weights-only allow-list; every other global is still refused.
LIGHTNING_SAFE_GLOBALS: list[tuple[type, str]] = [
    (LightningAttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (LightningAttributeDict, "lightning_fabric.utilities.data.AttributeDict"),
    (LightningAttributeDict, "lightning.fabric.utilities.data.AttributeDict"),
    (LightningAttributeDict, "lightning.pytorch.utilities.parsing.AttributeDict"),
    (ArgparseNamespace, "argparse.Namespace"),
]


def safe_torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")``, with one-line :class:`TeacherError` s.

    weights-only unpickling allows tensors and plain containers only: a pickle that asks for any other
    global (``os.system``, ``builtins.exec``, a class from a training script) is refused before
    anything is called, and we never retry with unsafe (code-running) loading. The only additions are the
    Lightning hyper-parameter containers of :data:`LIGHTNING_SAFE_GLOBALS`, mapped to inert stand-ins.
    A zip whose records claim more bytes than the file holds is refused before torch's reader allocates them.
    """
    from timmface.checkpoint import zip_problem

    try:
        problem = zip_problem(path)
    except OSError as e:
        raise TeacherError(f"{path}: cannot read ({e.strerror})") from None
    if problem is not None:
        raise TeacherError(f"{path}: cannot read as a PyTorch file (truncated or corrupt?): {problem}")
    try:
        with torch.serialization.safe_globals(LIGHTNING_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        if any(s in message for s in _REFUSED):
            m = re.search(r"GLOBAL (\S+)", message) or re.search(r"function (\S+)", message)
            what = f"'{m.group(1)}'" if m else "a non-data object"
            raise TeacherError(
                f"{path}: refused to unpickle: the file asks for {what}, which could run code "
                "(nothing was run; teachers are loaded weights-only)"
            ) from None
        raise TeacherError(f"{path}: cannot read as a PyTorch file (truncated or corrupt?): {_tail(e)}") from None
    except Exception as e:  # any other failure to parse: zip reader, truncated pickle, bad storage
        raise TeacherError(f"{path}: cannot read as a PyTorch file (truncated or corrupt?): {_tail(e)}") from None


def _tail(error: BaseException) -> str:
    # torch wraps unpickler errors in paragraphs of advice; the cause is on a line of its own
    from timmface.checkpoint import error_cause

    return error_cause(error)[:200]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file (a format that holds only tensors: nothing to execute)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise TeacherError(f"{path}: cannot read as safetensors (truncated or corrupt?): {first_line(e)}") from None


def load_weights(module: nn.Module, state: Mapping[str, Any], source: str, arch: str, assign: bool = False) -> None:
    """Copy ``state`` into ``module``; keys must match exactly (``num_batches_tracked`` may be absent).

    Raises one :class:`TeacherError` line naming the first few missing, unexpected or mis-shaped keys.
    Floating tensors end up float32 (a half-precision checkpoint gives a float32 teacher). ``assign``
    adopts the loaded tensors instead of copying them, for a ``module`` built on the meta device (no
    random initialisation, no second copy of the weights).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys ({format_keys(missing)})")
    if extra:
        problems.append(f"{len(extra)} unexpected keys ({format_keys(extra)})")
    if problems:
        raise TeacherError(f"{source}: weights do not match {arch}: {'; '.join(problems)}")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise TeacherError(f"{source}: entries that are not tensors: {format_keys(not_tensors)}")
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise TeacherError(f"{source}: weights do not match {arch}: wrong shapes ({format_keys(wrong)})")
    full = {k: torch.zeros((), dtype=torch.long) for k in expected if k.endswith("num_batches_tracked")}
    if assign:
        full.update({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    else:
        full.update(state)
    module.load_state_dict(full, strict=True, assign=assign)
