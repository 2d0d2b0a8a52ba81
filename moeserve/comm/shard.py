"""ShardInfo: a layer's view of its tensor-parallel group -- rank, size, and the one collective it may do.

Parallel layers compute ``local_*`` sizes from ``full_*`` sizes with ``split`` (a checked divide) and call
``all_reduce`` at most once in ``forward``; with ``size == 1`` that is a no-op and no process group exists.
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


SINGLE = ShardInfo()
