"""Process-group helpers: torchrun / SLURM world info, init, and small collectives.

Everything runs on PyTorch's own engine (``torch.distributed``): ``torchrun`` for single- and
multi-node launches (its rendezvous), or SLURM's ``srun`` (rank and world size from its
environment). NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "WorldInfo",
    "world_info_from_env",
    "shutdown_distributed",
    "slurm_rendezvous_env",
    "init_distributed",
    "is_distributed",
    "rank",
    "world_size",
    "barrier",
    "all_gather_concat",
    "broadcast_object",
    "all_reduce_max",
    "all_reduce_sum_",
    "average_running_stats_",
    "is_peer_failure",
    "first_line",
]


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    source: str = "single"
    """single | torchrun | slurm."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """``"node[01-04,07],gpu2"`` -> ``"node01"`` (enough for MASTER_ADDR; no scontrol needed)."""
    m = re.match(r"([^\[,]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def world_info_from_env(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Rank, local rank and world size from torchrun's or SLURM's environment variables."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return WorldInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "slurm")
    return WorldInfo()


def slurm_rendezvous_env(env: Mapping[str, str]) -> dict[str, str]:
    """The ``env://`` variables an ``srun`` task needs, from SLURM's: ``MASTER_ADDR`` (the first host
    of the step's node list), ``MASTER_PORT`` (29500 + job id mod 1000, so concurrent jobs on one node
    differ), ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``. The caller keeps values that are already set."""
    info = world_info_from_env(env)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    return {
        "MASTER_ADDR": _first_slurm_host(nodelist or "127.0.0.1"),
        "MASTER_PORT": str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000),
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank),
    }


_OWNED_GROUP = False  # whether init_distributed created the default group (then shutdown_distributed ends it)


def shutdown_distributed(failed: bool = False) -> None:
    """End the default process group if :func:`init_distributed` started it; a no-op otherwise.

    Called by the CLI when a command ends, so that a rank leaves with its own exit status rather than
    whatever the process group's C++ destructors do at interpreter exit. After a failure an NCCL group is
    left to the process exit (a communicator whose peer died can block a clean destroy)."""
    global _OWNED_GROUP
    if not (_OWNED_GROUP and dist.is_available() and dist.is_initialized()):
        return
    if failed and dist.get_backend() != "gloo":
        return
    _OWNED_GROUP = False
    dist.destroy_process_group()


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> WorldInfo:
    """Join the process group when launched by torchrun or srun; a no-op for a single process."""
    info = world_info_from_env()
    if not info.distributed or dist.is_initialized():
        return info
    if info.source == "slurm":
        for key, value in slurm_rendezvous_env(os.environ).items():
            os.environ.setdefault(key, value)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    timeout = datetime.timedelta(seconds=timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None:
        # torchrun --max-restarts restarts a failed group against the same TCPStore (its agent shares one
        # across rounds) and init_process_group's keys carry no round number: a restarted rank could read the
        # dead group's gloo/NCCL addresses and fail with "Connection refused" (seen in tests/test_faults.py).
        # A key prefix per restart keeps the rounds apart.
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"timmface/restart_{restart}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
    else:
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    global _OWNED_GROUP
    _OWNED_GROUP = True
    return info


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_max(value: float, device: torch.device) -> float:
    """The maximum of a Python number over all ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place (a no-op for a single process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


RUNNING_STATS = ("running_mean", "running_var")


def average_running_stats_(*modules: torch.nn.Module) -> int:
    """Average the BatchNorm running statistics of ``modules`` over all ranks, in place; returns how many
    buffers were averaged (0 for a single process or a model without BatchNorm).

    Under DDP without buffer broadcasts every rank's statistics follow its own share of the data; before an
    evaluation or a checkpoint they are made one set, the mean over ranks (timm's ``distribute_bn`` with
    ``reduce``: W times the samples behind each estimate, and what every rank then evaluates and rank 0
    saves). One all-reduce for all buffers. ``num_batches_tracked`` is the same on every rank.
    """
    if not is_distributed():
        return 0
    buffers = [
        b for m in modules for name, b in m.named_buffers() if name.rsplit(".", 1)[-1] in RUNNING_STATS
    ]  # fmt: skip
    if not buffers:
        return 0
    flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    with torch.no_grad():
        for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(part.view_as(b))
    return len(buffers)


def all_gather_concat(tensor: Tensor) -> Tensor:
    """Concatenate (along dim 0, in rank order) tensors whose first dimension may differ by rank."""
    if not is_distributed():
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(sizes_i), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in sizes_i]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes_i)])


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable Python object from ``src`` to every rank (internal data only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# how gloo and NCCL report a rank that died (connection closed / reset) or stopped answering (timeout); gloo
# raises a plain RuntimeError, so the message is all there is to go on
_PEER_FAILURE = (
    "Timed out waiting",
    "Connection reset by peer",
    "Connection closed by peer",
    "pair closure",
    "Socket Timeout",
    "timed out",
    "NCCL communicator was aborted",
    "NCCL error",
)


def is_peer_failure(error: BaseException) -> bool:
    """Whether a collective failed because another rank died or stopped answering within the process
    group's timeout (``dist_timeout``), as opposed to a bug in this rank."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _PEER_FAILURE)


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an error's message without the C++ source location gloo prefixes it with."""
    text = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[/path/gloo/transport/tcp/pair.cc:545] Read error ..."
    return text[:limit]
