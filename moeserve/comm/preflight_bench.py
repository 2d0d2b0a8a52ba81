"""Collective timings for a cluster preflight: all-reduce and all-to-all over a process group.

Each function is itself a collective: every rank of ``group`` calls it with the same arguments and gets the
same result (the slowest rank's median). Bandwidths follow the nccl-tests convention: ``algbw`` is bytes
per rank over time; ``busbw`` scales it to the bytes each link carries, comparable across group sizes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class OpTiming:
    op: str
    nbytes: int  # bytes of the buffer each rank contributes
    world_size: int
    seconds: float  # median seconds per op, the slowest rank's

    @property
    def algbw(self) -> float:
        """Algorithm bandwidth, bytes per second."""
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")

    @property
    def busbw(self) -> float:
        """Bytes per second each link carries: all-reduce moves 2(n-1)/n of the buffer, all-to-all (n-1)/n."""
        n = self.world_size
        factor = 2 * (n - 1) / n if self.op == "all_reduce" else (n - 1) / n
        return self.algbw * factor


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU); ``torch.<type>`` is torch.cuda or torch_npu's torch.npu."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def _median_seconds(op: Callable[[], Any], group: Any, device: torch.device, iters: int, warmup: int) -> float:
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        op()
    times = []
    for _ in range(iters):
        dist.barrier(group=group)  # start together, so a late peer is not counted as link time
        sync(device)
        start = time.perf_counter()
        op()
        sync(device)
        times.append(time.perf_counter() - start)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return float(slowest.item())


def _buffer(nbytes: int, world_size: int, device: torch.device) -> torch.Tensor:
    # float32 elements, rounded up to a multiple of world_size so all-to-all splits evenly
    numel = max(1, -(-nbytes // 4))
    numel = -(-numel // world_size) * world_size
    return torch.ones(numel, dtype=torch.float32, device=device)


def time_all_reduce(group: Any, nbytes: int, device: torch.device | str, iters: int = 10,
                    warmup: int = 2) -> OpTiming:
    """Median time of a sum all-reduce of ``nbytes`` (rounded up to whole float32 elements) per rank."""
    device = torch.device(device)
    world = dist.get_world_size(group)
    buf = _buffer(nbytes, world, device)
    seconds = _median_seconds(lambda: dist.all_reduce(buf, group=group), group, device, iters, warmup)
    return OpTiming("all_reduce", buf.numel() * 4, world, seconds)


def time_all_to_all(group: Any, nbytes: int, device: torch.device | str, iters: int = 10,
                    warmup: int = 2) -> OpTiming:
    """Median time of an even all-to-all of ``nbytes`` per rank (``nbytes / world`` to each peer)."""
    device = torch.device(device)
    world = dist.get_world_size(group)
    send = _buffer(nbytes, world, device)
    recv = torch.empty_like(send)
    seconds = _median_seconds(lambda: dist.all_to_all_single(recv, send, group=group), group, device, iters,
                              warmup)
    return OpTiming("all_to_all", send.numel() * 4, world, seconds)
