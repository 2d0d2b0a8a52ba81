"""RankExecutor: the executors whose ranks are stage worker processes (pp x tp ranks, on one node or many),
whatever starts them -- ``MultiprocExecutor`` (local processes), ``ClusterExecutor`` (``launch cluster``'s
per-node launchers), ``RayExecutor`` (Ray actors). This part is what they share: the step channel.

The coordinator binds one ZeroMQ ROUTER socket; each rank connects a DEALER (identity ``rank-N``), reports
``ReadyMsg`` once loaded, then receives every step plan as a typed msgpack message; the last stage's first
tp rank sends the logits back. Ranks run plans in the order sent, so several plans in flight keep all
pipeline stages busy. A rank that dies or reports an error fails the step with ``WorkerError`` within
seconds: each subclass says how it sees its ranks die (``_failures``). The KV transport rides on the same
channel (``rank_kv.py``).
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from typing import Any

import torch
import zmq

from moeserve.comm.messages import (
    DraftPlanMsg,
    ErrorMsg,
    ExpertLoadRequestMsg,
    KvLoadedMsg,
    KvServerMsg,
    LogitsMsg,
    PreflightMsg,
    ReadyMsg,
    ShutdownMsg,
    StatsMsg,
    StatsRequestMsg,
    StepPlanMsg,
    decode,
    encode,
)
from moeserve.coordinator.executor import Executor, RestartUnsupported, WorkerError
from moeserve.coordinator.rank_kv import RankKvChannel
from moeserve.kvstore.block_format import BlockLayout
from moeserve.kvstore.store import WRITE_BUFFER_BYTES, KVStore
from moeserve.kvstore.transport import KvTransport
from moeserve.stages.step_plan import DraftPlan, StepPlan
from moeserve.stages.worker_spec import WorkerSpec

logger = logging.getLogger(__name__)


class RankExecutor(Executor):
    """Subclasses start the ranks (``_start_ranks``, called once the socket is bound), say which have died
    (``_failures``) and stop them (``_stop_ranks``)."""

    failure_grace_s = 0.5  # how long a failure waits for a rank killed by a signal to show (see _root_cause)
    ranks_in_view = True  # every rank's death shows here at once (processes of this machine)

    def __init__(self, specs: list[WorkerSpec], coord_bind: str, startup_timeout_s: float = 600.0,
                 step_timeout_s: float = 120.0):
        """``specs``: every rank of the world; ``coord_bind``: the address to bind the ROUTER to."""
        super().__init__()
        self.specs = specs
        self._identities = frozenset(spec.identity for spec in specs)  # of the ranks' current generation
        self.num_ranks = len(specs)
        self.step_timeout_s = step_timeout_s
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a plan for a rank that is gone is an error, not a drop
        self.sock.bind(coord_bind)
        self.startup_timeout_s = startup_timeout_s
        self.step_id = 0
        self._logits: dict[int, torch.Tensor] = {}
        self.loaded_bytes: dict[int, int] = {}
        self.kv_channel = RankKvChannel(self.num_ranks, self._broadcast, self._read_arrived)
        try:
            self._start_ranks()
            self._await_ready()
        except BaseException:
            self.shutdown()
            raise

    def _await_ready(self) -> None:
        """Wait until every rank has loaded and said so (``ReadyMsg``), keeping what they report on the way."""
        while len(self.loaded_bytes) < len(self.specs):
            msg = self._receive(self.startup_timeout_s, "start")
            if isinstance(msg, ReadyMsg):
                self.loaded_bytes[msg.rank] = msg.loaded_bytes
            elif isinstance(msg, KvServerMsg):
                self.kv_channel.block_servers.append((msg.address, msg.layer_start, msg.num_layers))
            elif isinstance(msg, PreflightMsg):
                self.preflight = msg
                logger.info("preflight over %d ranks, %d bytes: all-reduce %.3f ms, all-to-all %.3f ms",
                            msg.world_size, msg.nbytes, msg.all_reduce_s * 1e3, msg.all_to_all_s * 1e3)

    def restart(self) -> None:
        """Kill every rank (the survivors too: their communicator lost a member), start the next generation on
        a fresh rendezvous and wait for it to load. What old ranks still send is dropped; steps in flight are
        lost."""
        self._kill_ranks()
        self.specs = self._next_specs()
        self._identities = frozenset(spec.identity for spec in self.specs)
        self._logits.clear()
        self.loaded_bytes.clear()
        self.kv_channel.clear()
        self._start_ranks()
        self._await_ready()

    @abstractmethod
    def _start_ranks(self) -> None:
        """Start the ranks this executor owns (they connect to the bound socket and report ready)."""

    @abstractmethod
    def _failures(self, reported: int | None = None) -> list[WorkerError]:
        """Ranks (other than ``reported``) that have died, each as a WorkerError naming it."""

    @abstractmethod
    def _stop_ranks(self) -> None:
        """Stop the ranks (asked to stop already; called once, from ``shutdown``)."""

    def _next_specs(self) -> list[WorkerSpec]:  # the next generation's (Ray places its actors anew)
        return [spec.next_generation() for spec in self.specs]

    def _kill_ranks(self) -> None:
        """Kill every rank now, without asking (before ``restart``); the executors that can restart say how."""
        raise RestartUnsupported(f"{type(self).__name__} cannot restart its ranks")

    def _where(self, rank: int) -> str:
        spec = self.specs[rank]
        return f"rank {rank} (node {spec.node})" if spec.node else f"rank {rank}"

    def _root_cause(self, reported: int | None = None, message: str = "") -> WorkerError | None:
        """The failure to report. A rank that errs or exits is often the echo of another rank's death (a
        broken connection), which shows a moment later, on another node through its launcher: wait briefly
        for a rank killed by a signal, and name that one if it shows; else the first failure seen; else the
        reporting rank's own error."""
        deadline = time.monotonic() + self.failure_grace_s
        found = self._failures(reported)
        while not any(e.killed for e in found) and time.monotonic() < deadline:
            if found and self.ranks_in_view:
                break
            time.sleep(0.1)
            found = self._failures(reported)
        found.sort(key=lambda e: not e.killed)
        if found:
            return found[0]
        if reported is None:
            return None
        return WorkerError(f"{self._where(reported)} failed: {message}", rank=reported,
                           node=self.specs[reported].node)

    def check_alive(self) -> None:
        """Raise WorkerError for a rank that has died, here or on another node (also between steps)."""
        if self._failures():
            error = self._root_cause()
            if error is not None:
                raise error

    def _receive(self, timeout_s: float, what: str) -> object:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(500):
                msg = self._read_one()
                if msg is not None:
                    return msg
                continue
            self.check_alive()
        raise WorkerError(f"no answer from the stage workers within {timeout_s:.0f} s ({what})")

    def _read_one(self) -> object | None:
        """One message from the socket; an error raises, statistics go to their sink (None is returned)."""
        identity, frame, *data = self.sock.recv_multipart(copy=False)
        if identity.bytes not in self._identities:  # a rank of an earlier generation, killed by a restart
            return None
        msg = decode(frame.bytes)
        if isinstance(msg, LogitsMsg):
            msg.attach(data[0].buffer if data else b"")
        if isinstance(msg, ErrorMsg):
            error = self._root_cause(msg.rank, msg.message)
            assert error is not None
            raise error
        if isinstance(msg, KvLoadedMsg):
            self.kv_channel.receive(msg)
            return None
        sink = self.sinks.get(type(msg))
        if sink is not None:  # statistics ride along with whatever we wait for
            sink(msg)
            return None
        return msg

    def _broadcast(self, frame: bytes) -> None:
        for spec in self.specs:
            try:
                self.sock.send_multipart([spec.identity, frame])
            except zmq.ZMQError as e:  # EHOSTUNREACH: the rank's connection is gone, the echo of its death,
                error = self._root_cause()  # which on another node shows a moment later, through its launcher
                raise (error or WorkerError(f"{self._where(spec.rank)} is unreachable ({e})")) from e

    def submit(self, plan: StepPlan, prev_token_ids: torch.Tensor | None = None) -> int:
        """Send a step plan to every rank without waiting; returns its step id for ``collect``. (Stage
        workers take no placeholder tokens: async scheduling is for one process.)"""
        if plan.pending_rows or prev_token_ids is not None:
            raise ValueError("stage workers take no placeholder tokens (async scheduling is one-process only)")
        self.step_id += 1
        self._broadcast(encode(StepPlanMsg(self.step_id, plan.token_ids, plan.query_lens, plan.num_computed,
                                           [list(t) for t in plan.block_tables], plan.sample_rows,
                                           plan.num_spec, plan.wait_loads)))
        return self.step_id

    def draft(self, plan: DraftPlan) -> torch.Tensor:
        """One MTP pass on the last stage (speculative decoding); waits for its logits."""
        self.step_id += 1
        step = plan.step
        self._broadcast(encode(DraftPlanMsg(self.step_id, step.token_ids, step.query_lens, step.num_computed,
                                            [list(t) for t in step.block_tables], step.sample_rows,
                                            plan.hidden_rows, plan.chained)))
        return self.collect(self.step_id)

    def collect(self, step_id: int) -> torch.Tensor:
        """The logits of a submitted step (results of later steps that arrive first are kept)."""
        while step_id not in self._logits:
            msg = self._receive(self.step_timeout_s, f"step {step_id}")
            if isinstance(msg, LogitsMsg):
                self._logits[msg.step_id] = msg.tensor()
        return self._logits.pop(step_id)

    def kv_transport(self, layout: BlockLayout, num_host_blocks: int, store: KVStore | None,
                     read_threads: int = 4, nixl: bool = False, write_buffer: int = WRITE_BUFFER_BYTES) -> KvTransport:
        return self.kv_channel  # the ranks' movers answer KvSaveMsg / KvLoadMsg sent through the step channel

    def kv_block_sources(self, layout: BlockLayout, bind_host: str, backend: str) -> list[tuple[str, int, int]]:
        return list(self.kv_channel.block_servers)  # reported by the ranks at start (KvServerMsg)

    def request_expert_load(self, seq: int) -> None:
        """Ask every rank for its expert-load counters; each answers after the plans sent before this, and
        the answers go to ``sinks[ExpertLoadMsg]`` whenever the executor next reads its socket."""
        self._broadcast(encode(ExpertLoadRequestMsg(seq)))

    def broadcast(self, msg: Any) -> None:
        """Send a typed message to every rank, in order with the step plans."""
        self._broadcast(encode(msg))

    def poll_messages(self) -> None:
        """Read what has arrived without waiting (between steps): statistics, and logits kept for later."""
        while self.sock.poll(0):
            msg = self._read_one()
            if isinstance(msg, LogitsMsg):
                self._logits[msg.step_id] = msg.tensor()

    def _read_arrived(self, timeout_s: float) -> None:
        """``poll_messages``, first waiting up to ``timeout_s`` for a message (the KV channel's loads)."""
        if timeout_s > 0:
            self.sock.poll(int(timeout_s * 1000))
        self.poll_messages()

    def stage_stats(self, reset: bool = False) -> list[StatsMsg]:
        """Per-rank busy time in the current window, asked after every plan sent so far has run. Ranks keep
        it from the first request on (``reset=True`` opens the window; before it they report zeros)."""
        self._broadcast(encode(StatsRequestMsg(reset)))
        stats: dict[int, StatsMsg] = {}
        while len(stats) < len(self.specs):
            msg = self._receive(self.step_timeout_s, "stats")
            if isinstance(msg, StatsMsg):
                stats[msg.rank] = msg
            elif isinstance(msg, LogitsMsg):
                self._logits[msg.step_id] = msg.tensor()
        return [stats[r] for r in sorted(stats)]

    def shutdown(self) -> None:
        """Stop every rank (idempotent)."""
        if self.ctx.closed:
            return
        frame = encode(ShutdownMsg("engine closed"))
        for spec in self.specs:
            try:
                self.sock.send_multipart([spec.identity, frame], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._stop_ranks()
        self.ctx.destroy(linger=0)
