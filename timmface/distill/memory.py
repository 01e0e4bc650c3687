"""A cross-batch FIFO of teacher embeddings for the relation terms (``distill.memory_size``).

The relation terms (MSE, KL, EKD) compare each student embedding ``s_i`` with ``K`` teacher embeddings
``m_j`` held from the last steps, ``s_i . m_j`` against ``t_i . m_j``, so a row sees ``K >> batch`` pairs
(as in cross-batch memories for metric learning, XBM, Wang et al. 2020, here on the frozen teacher's side,
whose embeddings do not drift). The memory is filled with every rank's teacher embeddings of a micro-step
(all-gathered, in rank order, which is the global batch order), before the loss of that micro-step, so every
rank holds the same memory and the batch's own rows are among the columns (their own slot is left out).
It is saved in the checkpoint and restored exactly on resume.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TeacherMemory"]


class TeacherMemory:
    """The last ``size`` teacher embeddings (L2-normalised, float32) and their labels, oldest overwritten first.

    Slots fill ``0, 1, ...`` and wrap around once full; :meth:`view` returns the filled slots (their order
    is the slot order, which the relation terms do not depend on).
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu") -> None:
        if size < 1:
            raise ValueError("memory size must be >= 1")
        self.size, self.dim = int(size), int(dim)
        self.emb = torch.zeros(self.size, self.dim, dtype=torch.float32, device=device)
        self.labels = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.ptr = 0  # the next slot to write
        self.count = 0  # filled slots

    @torch.no_grad()
    def push(self, emb: Tensor, labels: Tensor) -> Tensor:
        """Write ``emb`` (``n x D``, any scale: normalised here) and ``labels`` (``n``) into the next ``n``
        slots; returns those slots (``n``, int64), where row ``i`` went."""
        n = emb.shape[0]
        if n > self.size:
            raise ValueError(f"cannot push {n} rows into a memory of {self.size}")
        slots = (self.ptr + torch.arange(n, device=self.emb.device)) % self.size
        self.emb[slots] = F.normalize(emb.detach().float().to(self.emb.device), dim=1)
        self.labels[slots] = labels.to(self.labels.device, torch.long)
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.size, self.count + n)
        return slots

    def view(self) -> tuple[Tensor, Tensor]:
        """``(emb, labels)`` of the filled slots: ``M x D`` and ``M``, ``M = min(size, rows pushed)``."""
        return self.emb[: self.count], self.labels[: self.count]

    def state_dict(self) -> dict[str, Any]:
        return {
            "emb": self.emb[: self.count].cpu().clone(),
            "labels": self.labels[: self.count].cpu().clone(),
            "ptr": self.ptr,
            "size": self.size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore a saved memory; returns False (and leaves this one empty) when its size or width differ."""
        emb, labels = state["emb"], state["labels"]
        if int(state["size"]) != self.size or (emb.numel() and emb.shape[1] != self.dim):
            return False
        n = emb.shape[0]
        self.emb.zero_()
        self.labels.fill_(-1)
        self.emb[:n] = emb.to(self.emb)
        self.labels[:n] = labels.to(self.labels)
        self.ptr, self.count = int(state["ptr"]), n
        return True
