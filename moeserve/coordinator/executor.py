"""The executor interface: how the engine runs the model of one replica, wherever its ranks live.

vLLM v1 names the same role ``Executor``. Four implementations, chosen at start and never asked which they
are: ``InProcessExecutor`` (one rank, in the engine's process), ``MultiprocExecutor`` (one process per rank on
this machine, ``--distributed-executor-backend mp``), ``ClusterExecutor`` (``moeserve launch cluster``: the
ranks of every node, started by each node's launcher) and ``RayExecutor`` (Ray actors,
``--distributed-executor-backend ray``). The last three share the ZeroMQ step channel of rank_executor.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moeserve.comm.topology import ParallelDims
from moeserve.kvstore.store import WRITE_BUFFER_BYTES
from moeserve.stages.step_plan import DraftPlan, StepPlan
from moeserve.stages.worker_spec import WorkerSpec

if TYPE_CHECKING:
    from moeserve.comm.messages import PreflightMsg, StatsMsg
    from moeserve.kvstore.block_format import BlockLayout
    from moeserve.kvstore.store import KVStore
    from moeserve.kvstore.transport import KvTransport


class WorkerError(RuntimeError):
    """A rank died, timed out or failed. ``exit_code``: the rank's, where it exited (negative: the signal that
    killed it). The message names the rank and, where known, its node; ``rank`` and ``node`` say them apart
    (None where unknown: a step that timed out)."""

    def __init__(self, message: str, exit_code: int | None = None, rank: int | None = None,
                 node: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.rank = rank
        self.node = node

    @property
    def killed(self) -> bool:
        return self.exit_code is not None and self.exit_code < 0


class RestartUnsupported(WorkerError):
    """The executor cannot replace its ranks (``Executor.restart``): a rank's death stops the engine."""


@dataclass(frozen=True)
class ReplicaLayout:
    """What every rank of one replica shares; ``spec`` adds what differs per rank and per launch."""

    model: str
    dims: ParallelDims
    stage_layers: tuple[int, ...]
    dtype: str
    device: str  # device type (and default index) from the engine config
    block_size: int
    num_blocks: int
    options: tuple[tuple[str, Any], ...] = ()  # further WorkerSpec fields every rank shares (load_format, ...)

    def device_of(self, local_rank: int) -> str:
        """Accelerator ranks on one machine take one device each, by local rank."""
        return "cpu" if self.device == "cpu" else f"{self.device.split(':')[0]}:{local_rank}"

    def option(self, name: str) -> Any:
        return dict(self.options)[name]

    def spec(self, rank: int, local_rank: int, init_method: str, coord_addr: str, **fields: Any) -> WorkerSpec:
        return WorkerSpec(rank=rank, pp=self.dims.pp, tp=self.dims.tp, ep=self.dims.ep, model=self.model,
                          dtype=self.dtype, device=self.device_of(local_rank), block_size=self.block_size,
                          num_blocks=self.num_blocks, stage_layers=self.stage_layers, init_method=init_method,
                          coord_addr=coord_addr, **dict(self.options), **fields)


class Executor(ABC):
    """Runs step plans on the ranks of one replica, and carries everything else the engine says to them.

    Contract: ``submit`` returns at once with a handle; ``collect(handle)`` gives that step's logits
    [len(sample_rows), vocab]; plans and messages run on every rank in the order they were given. Messages
    the ranks send of their own accord (expert-load answers, placement readiness) go to ``sinks[type]``
    whenever the executor reads what arrived: while collecting, and in ``poll_messages``. A dead rank shows
    as ``WorkerError`` from any call, or from ``check_alive`` between steps."""

    num_ranks: int = 1
    # the latent cache's capacity in blocks as the ranks allocated it (0: the layout's ``num_blocks``)
    num_blocks: int = 0
    preflight: PreflightMsg | None = None  # rank 0's timing of the collectives before loading (several ranks)

    def __init__(self) -> None:
        self.sinks: dict[type, Callable[[Any], None]] = {}

    # ---- steps ----
    @abstractmethod
    def submit(self, plan: StepPlan, prev_token_ids: torch.Tensor | None = None) -> Any:
        """Start a step; ``prev_token_ids``: the previous batch's sampled ids on the device, for the plan's
        placeholders (async scheduling, which only one process supports)."""

    @abstractmethod
    def collect(self, handle: Any) -> torch.Tensor:
        """The logits of a submitted step."""

    def execute(self, plan: StepPlan, prev_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.collect(self.submit(plan, prev_token_ids))

    @abstractmethod
    def draft(self, plan: DraftPlan) -> torch.Tensor:
        """One pass of the MTP module on the last stage (speculative decoding, after the step whose hidden
        states it reads has been collected); waits for its logits [len(sample_rows), vocab]."""

    # ---- statistics ----
    @abstractmethod
    def stage_stats(self, reset: bool = False) -> list[StatsMsg]:
        """Per-rank busy time in the current window (``reset`` opens a new one); empty with one process, whose
        busy time is the engine's own."""

    @abstractmethod
    def request_expert_load(self, seq: int) -> None:
        """Ask every rank for its expert-load counters; the answers (``ExpertLoadMsg``, one per rank) go to
        ``sinks[ExpertLoadMsg]`` once they have arrived, without the engine waiting for them."""

    @abstractmethod
    def poll_messages(self) -> None:
        """Hand what has arrived to the sinks, without waiting (between steps)."""

    def trace_experts(self, enabled: bool) -> bool:
        """Keep the routed expert ids of each step's sampled rows (``last_expert_ids``); False where the ranks
        cannot (stage workers do not return traces yet)."""
        return False

    def last_expert_ids(self) -> torch.Tensor | None:
        """[sample rows, moe layers, top_k] of the latest step, while tracing."""
        return None

    # ---- messages to every rank ----
    @abstractmethod
    def broadcast(self, msg: Any) -> None:
        """Send a typed message (an expert placement) to every rank, in order with the step plans."""

    # ---- the KV connector's side on the ranks (kvstore/connector.py) ----
    @abstractmethod
    def kv_transport(self, layout: BlockLayout, num_host_blocks: int, store: KVStore | None,
                     read_threads: int = 4, nixl: bool = False, write_buffer: int = WRITE_BUFFER_BYTES) -> KvTransport:
        """How the coordinator's KV connector reaches the ranks' BlockMovers: saves and loads in order with
        the step plans, the ranks' ``KvLoadedMsg`` reports polled. The arguments serve one process (its
        mover's layout, host slots, store client, reader threads and write slots' bytes; ``nixl``: a decode
        instance's NIXL agent); stage workers have theirs from their specs."""

    @abstractmethod
    def kv_block_sources(self, layout: BlockLayout, bind_host: str, backend: str) -> list[tuple[str, int, int]]:
        """A prefill instance's block servers, one per stage: (address, first layer, number of layers). Stage
        workers start theirs with their spec and report them (``KvServerMsg``) before they are ready; one
        process starts its own here, on ``bind_host`` (``tcp://host``) and any free port, with a NIXL agent
        for ``backend`` nixl; it stops with ``shutdown``."""

    # ---- health ----
    @abstractmethod
    def check_alive(self) -> None:
        """Raise WorkerError naming a rank that has died (also between steps)."""

    def restart(self) -> None:
        """Replace every rank of the replica with a fresh one, in a new torch.distributed group, after one has
        died (a gloo / NCCL communicator that lost a member cannot be repaired, so the survivors go too). The
        ranks' caches are lost and their weights are loaded again; the engine re-admits its requests
        (``Engine.restart_ranks``). Raises WorkerError when the new ranks do not come up, RestartUnsupported
        where the executor cannot (one process: nothing of it can die alone)."""
        raise RestartUnsupported(f"{type(self).__name__} cannot restart its ranks")

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every rank and give back what they hold (idempotent)."""


Launcher = Callable[[ReplicaLayout], Executor]
