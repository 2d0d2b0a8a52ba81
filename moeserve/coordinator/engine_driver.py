"""EngineDriver: the engine loop's body without threads or asyncio, which both ``AsyncEngine``'s thread
(coordinator/async_engine.py) and a replica process (frontend/replica.py) run. Its loop reads as numbered
steps: receive commands -> step (schedule, run, sample, process) -> publish the step's updates as one batch ->
publish stats.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from moeserve.coordinator.engine import Engine
from moeserve.coordinator.executor import WorkerError
from moeserve.coordinator.outputs import RequestOutput
from moeserve.coordinator.request import RequestError, RequestStatus
from moeserve.coordinator.sampling import SamplingParams
from moeserve.coordinator.supervisor import RankSupervisor, RecoveryStats, RestartPolicy, StreamInterrupted

logger = logging.getLogger(__name__)


@dataclass
class EngineUpdate:
    """One step's output for one request, with what the front end may return besides tokens."""

    output: RequestOutput
    queue_s: float | None = None  # on the first update: engine arrival -> the step that first scheduled it
    expert_ids: list[list[list[int]]] | None = None  # [new tokens][moe layers][top_k], when asked


@dataclass(frozen=True)
class EngineSnapshot:
    """Load and cache figures after the latest step (read by the router, /metrics and tests)."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks_used: int = 0
    num_kv_blocks_total: int = 0
    num_prefix_hit_tokens: int = 0  # prompt tokens served from the prefix cache, cumulative
    num_prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache, cumulative
    num_unfinished: int = 0  # requests the engine holds (running + waiting)
    kv_tiers: dict = field(default_factory=dict)  # KV connector counters (KVConnector.snapshot)
    # speculative decoding, cumulative: drafts verified, drafts accepted, verifications (a sequence's drafts
    # in one step)
    num_spec_draft_tokens: int = 0
    num_spec_accepted_tokens: int = 0
    num_spec_verifies: int = 0
    # self-healing (supervisor.py): the ranks are being restarted now; restarts by "rank/node", cumulative;
    # seconds the latest restart took and all of them; streams resumed and requests queued again
    recovering: bool = False
    rank_restarts: dict = field(default_factory=dict)
    last_recovery_s: float = 0.0
    recovery_s_total: float = 0.0
    num_resumed_requests: int = 0
    num_requeued_requests: int = 0

    @classmethod
    def of(cls, engine: Engine, recovery: RecoveryStats | None = None, recovering: bool = False) -> EngineSnapshot:
        kv = engine.kv
        tiers = getattr(kv, "connector", None)
        side = getattr(engine, "prefill_side", None)
        kv_counters = {**(tiers.snapshot() if tiers is not None else {}), **(side.snapshot() if side else {})}
        r = recovery or RecoveryStats({})
        return cls(len(engine.scheduler.running), len(engine.scheduler.waiting),
                   kv.num_blocks - kv.num_free_blocks, kv.num_blocks,
                   int(getattr(kv, "num_prefix_hit_tokens", 0)), int(getattr(kv, "num_prefix_query_tokens", 0)),
                   len(engine.requests), kv_counters,
                   engine.stats.num_draft_tokens, engine.stats.num_accepted_tokens, engine.stats.num_spec_verifies,
                   recovering, dict(r.restarts), r.last_recovery_s, r.recovery_s_total, r.num_resumed,
                   r.num_requeued)


Publish = Callable[[list[tuple[str, "EngineUpdate | Exception"]]], None]


class InjectedFault(RuntimeError):
    """The test fault injection (``FAULT_ENV``): what the engine step raises once the set steps ran."""


FAULT_ENV = "MOESERVE_TEST_FAULT_AFTER_STEPS"


def injected_fault_steps(environ: Mapping[str, str] = os.environ) -> int | None:
    """TEST FAULT INJECTION, off unless ``MOESERVE_TEST_FAULT_AFTER_STEPS=N`` is set: the engine step after
    N steps raises ``InjectedFault`` (tests of the engine-failure path set it; read once as a loop starts)."""
    raw = environ.get(FAULT_ENV, "")
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"{FAULT_ENV} must be a number of engine steps, got {raw!r}")
    return int(raw)


class EngineDriver:
    """The engine loop's body, without threads: commands in, batches of updates out through ``publish``.

    A rank that died (WorkerError) is replaced by the supervisor (supervisor.py): the outputs its step had
    processed are published, the ranks restart, and the requests go on. Whatever else raises here (a bug, a
    rank that keeps dying) propagates to the owner of the loop, which fails every request it holds and stops:
    the engine's state after a half-done step is not trusted. ``on_recovering``: called (in the loop's thread)
    with the snapshot that says the ranks are restarting, before the restart blocks the loop.
    ``fault_after_steps``: the test fault injection (``injected_fault_steps``); None in service."""

    def __init__(self, engine: Engine, publish: Publish, fault_after_steps: int | None = None,
                 on_recovering: Callable[[EngineSnapshot], None] | None = None):
        self.engine = engine
        self.publish = publish
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self._arrival: dict[str, float] = {}  # requests not yet scheduled -> engine arrival time
        self._traced: set[str] = set()
        self.supervisor = RankSupervisor(RestartPolicy.of(engine.config))
        self.on_recovering = on_recovering
        self.snapshot = EngineSnapshot.of(engine)
        self.num_steps = 0
        self.fault_after_steps = fault_after_steps

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
            trace_experts: bool = False) -> None:
        self.commands.put(("add", request_id, prompt_token_ids, params, trace_experts))

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))

    def has_work(self) -> bool:
        return self.engine.has_unfinished() or not self.commands.empty()

    def run_once(self) -> None:
        self.receive()                                              # 1. receive adds and aborts
        if self.engine.has_unfinished():
            try:
                self.step()                                         # 2-3. step and publish
            except WorkerError as e:
                self.recover(e)                                     #      (a rank died: replace it)
        self._take_snapshot()                                       # 4. stats

    def _take_snapshot(self, recovering: bool = False) -> None:
        self.snapshot = EngineSnapshot.of(self.engine, self.supervisor.stats, recovering)

    def recover(self, error: WorkerError) -> None:
        """A rank died: publish what the failed step had processed, restart the ranks, queue the requests
        again (those mid-decode end instead when resuming is off). Raises once the supervisor gives up."""
        self._publish_outputs(self.engine.take_processed(), {}, None)
        self._take_snapshot(recovering=True)
        if self.on_recovering is not None:
            self.on_recovering(self.snapshot)
        requests = self.supervisor.recover(self.engine.restart_ranks, error)
        going_on, ended = self.supervisor.split(requests)
        failed: list[tuple[str, EngineUpdate | Exception]] = []
        for req in ended:
            self.engine.abort(req.request_id)
            self._forget(req.request_id)
            failed.append((req.request_id, StreamInterrupted(
                f"a rank failed after {req.num_output_tokens} tokens of this stream and resuming is off "
                f"(--no-resume-streams): {error}")))
        if failed:
            self.publish(failed)
        stats = self.supervisor.stats
        logger.warning("the replica's ranks are back after %.1f s: %d stream(s) resumed, %d request(s) queued "
                       "again, %d stream(s) ended", stats.last_recovery_s,
                       sum(r.num_output_tokens > 0 for r in going_on), sum(r.num_output_tokens == 0 for r in going_on),
                       len(ended))
        self._take_snapshot()

    def receive(self) -> None:
        batch: list[tuple[str, EngineUpdate | Exception]] = []
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                _, rid, ids, params, trace = cmd
                try:
                    self.engine.add_request(rid, prompt_token_ids=ids, params=params)
                except RequestError as e:
                    batch.append((rid, e))
                    continue
                self._arrival[rid] = time.monotonic()
                if trace:
                    self._traced.add(rid)
            else:
                self.engine.abort(cmd[1])
                self._forget(cmd[1])
        if batch:
            self.publish(batch)

    def _forget(self, rid: str) -> None:
        self._arrival.pop(rid, None)
        self._traced.discard(rid)

    def step(self) -> None:
        # while a request asks for its experts, steps run synchronously, so that the executor's trace of
        # the latest step belongs to the batch that step finishes (False: the executor keeps no trace)
        self.engine.sync_steps = self.engine.executor.trace_experts(bool(self._traced)) and bool(self._traced)
        t0 = time.monotonic()
        if self.fault_after_steps is not None and self.num_steps >= self.fault_after_steps:
            raise InjectedFault(f"test fault injection: {FAULT_ENV}={self.fault_after_steps} made engine "
                                f"step {self.num_steps + 1} raise")
        self.num_steps += 1
        outputs = self.engine.step()
        started = [rid for rid in self._arrival
                   if (r := self.engine.requests.get(rid)) is None or r.status is not RequestStatus.WAITING]
        queue_s = {rid: t0 - self._arrival.pop(rid) for rid in started}
        trace = self.engine.executor.last_expert_ids()  # [sample rows, moe layers, top_k] or None
        if trace is not None and trace.shape[0] != len(outputs):
            trace = None  # NOTE: outputs follow the sample rows of the step; if not, no trace this step
        self._publish_outputs(outputs, queue_s, trace)

    def _publish_outputs(self, outputs: list[RequestOutput], queue_s: dict[str, float],
                         trace: torch.Tensor | None) -> None:
        batch: list[tuple[str, EngineUpdate | Exception]] = []
        for row, out in enumerate(outputs):
            rid = out.request_id
            experts = trace[row].tolist() if trace is not None and rid in self._traced else None
            batch.append((rid, EngineUpdate(out, queue_s.get(rid), [experts] if experts is not None else None)))
            if out.finished:
                self._forget(rid)
        if batch:
            self.publish(batch)

    def check_workers(self) -> None:
        """Between steps: a stage worker that died while the engine was idle is replaced (as in a step); the
        engine's idle housekeeping (KV transfers) runs, and the snapshot catches up with it."""
        try:
            self.engine.check_workers()
        except WorkerError as e:
            self.recover(e)
        self._take_snapshot()
