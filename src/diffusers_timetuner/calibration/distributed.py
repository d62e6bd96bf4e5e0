"""Splitting calibration samples across processes (Accelerate) and reducing what the decisions depend on.

Every process builds the SAME global calibration set from the seed (noise, conditions, data indices), cut into
global mini-batches of ``batch_size``; each process keeps the rows ``rank::world_size`` of every mini-batch. Losses are
reduced as sums of per-sample losses (and gradients as sums) with ``accelerator.reduce``, so every process sees the
same numbers, takes the same decision and holds the same table; the main process's decision is also broadcast so
that float round-off can never split the processes. Without an accelerator everything is local (one process).
"""

from __future__ import annotations

from typing import List

import torch


class Distributed:
    """Thin wrapper around an optional ``accelerate.Accelerator`` (or ``PartialState``).

    Args:
        accelerator: ``None`` for a single process.
    """

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        state = getattr(accelerator, "state", accelerator)
        self.rank = int(getattr(state, "process_index", 0)) if accelerator is not None else 0
        self.world_size = int(getattr(state, "num_processes", 1)) if accelerator is not None else 1
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def shard(self, num_samples: int, batch_size: int) -> List[torch.Tensor]:
        """Global sample indices this process holds, one tensor per global mini-batch (empty ones dropped)."""
        out = []
        for start in range(0, num_samples, batch_size):
            rows = torch.arange(start, min(start + batch_size, num_samples))
            mine = rows[self.rank :: self.world_size]
            if len(mine):
                out.append(mine)
        return out

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (float64 on CPU for an exact, order-independent enough reduction)."""
        value = value.detach().to(torch.float64)
        if self.world_size == 1:
            return value
        return self.accelerator.reduce(value.to(self.device), reduction="sum").cpu()

    def broadcast_float(self, value: float) -> float:
        """The main process's value on every process."""
        if self.world_size == 1:
            return float(value)
        from accelerate.utils import broadcast

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(broadcast(t, from_process=0).cpu()[0])
