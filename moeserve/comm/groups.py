"""Process groups, built once per rank from ``ParallelDims``, by device type.

NCCL for cuda, HCCL for npu (torch_npu is imported only then), gloo for cpu. Every group gets a timeout, so
a collective whose peer died fails instead of hanging forever.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moeserve.comm.shard import ShardInfo
from moeserve.comm.topology import ParallelDims

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def backend_for(device: torch.device | str) -> str:
    """The collective backend of a device ("cpu", "cuda:1", "npu", a ``torch.device``).

    For npu this imports torch_npu, which registers the npu device type and the hccl backend; no other
    device imports it. Call it before ``torch.device("npu...")``: until torch_npu is imported, torch itself
    rejects the "npu" device string, so a string is parsed here rather than by torch.
    """
    kind = device.split(":", 1)[0].strip() if isinstance(device, str) else device.type
    if kind not in BACKENDS:
        raise ValueError(f"no distributed backend for device type {kind!r} (supported: {sorted(BACKENDS)})")
    if kind == "npu":
        try:
            importlib.import_module("torch_npu")
        except ImportError as e:
            raise ImportError(
                f"device {str(device)!r} needs torch_npu, the Ascend adapter for PyTorch, in the version built "
                f"for this torch ({torch.__version__}): pip install 'moeserve[npu]' or Ascend's torch_npu wheel "
                f"for your CANN toolkit ({e})") from e
    return BACKENDS[kind]


@dataclass(frozen=True)
class RankGroups:
    """What one rank needs: its coordinates, its stage's tp shard, and its pipeline peers."""

    rank: int
    dims: ParallelDims
    tp: ShardInfo
    prev_rank: int | None
    next_rank: int | None
    timeout: timedelta


def init_groups(rank: int, dims: ParallelDims, device: torch.device | str, init_method: str,
                timeout_s: float = 60.0) -> RankGroups:
    """Join the world (TCPStore / file rendezvous given by ``init_method``) and build the tp groups.

    Every rank creates every stage's group in the same order, as torch.distributed requires.
    """
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank,
                            world_size=dims.world_size, timeout=timeout)
    my_group: Any = None
    for replica in range(dims.replicas):
        for stage in range(dims.pp):
            ranks = dims.stage_ranks(replica, stage)
            group = dist.new_group(ranks, timeout=timeout) if dims.tp > 1 else None
            if rank in ranks:
                my_group = group
    coord = dims.coord(rank)
    return RankGroups(rank=rank, dims=dims, tp=ShardInfo(coord.tp_rank, dims.tp, my_group),
                      prev_rank=dims.pp_peer(rank, -1), next_rank=dims.pp_peer(rank, +1), timeout=timeout)


def send_hidden(h: torch.Tensor, dst: int) -> None:
    """Pipeline hand-off of a stage's output hidden states [T, hidden] to the same tp rank downstream."""
    dist.send(h.contiguous(), dst)


def recv_hidden(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int) -> torch.Tensor:
    h = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(h, src)
    return h
