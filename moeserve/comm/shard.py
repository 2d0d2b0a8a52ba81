"""ShardInfo: a layer's view of its tensor-parallel group -- rank, size, and its collectives.

Parallel layers compute ``local_*`` sizes from ``full_*`` sizes with ``split`` (a checked divide) and call
``all_reduce`` at most once in ``forward`` (the LM head calls ``all_gather`` instead); with ``size == 1``
both are no-ops and no process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ShardInfo:
    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup when size > 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"shard rank {self.rank} is outside [0, {self.size})")

    def split(self, full: int, what: str) -> int:
        """The local share of ``full``; refuses sizes that do not divide."""
        if full % self.size:
            raise ValueError(f"{what} ({full}) is not divisible by the tensor-parallel size ({self.size})")
        return full // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group in place (no-op for one rank)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim``, in rank order (``x`` itself for one rank)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


SINGLE = ShardInfo()
