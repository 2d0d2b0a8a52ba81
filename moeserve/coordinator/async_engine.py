"""AsyncEngine: an asyncio face on the engine. The engine loop runs in its own thread; each request gets an
async stream of outputs. Dropping a stream early (client gone, task cancelled) aborts the request, which frees
its cache blocks at once.

``EngineDriver`` is the synchronous part that both this thread and a replica process (frontend/replica.py)
run. Its loop reads as numbered steps: receive commands -> step (schedule, run, sample, process) -> publish
the step's updates as one batch -> publish stats.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import torch

from moeserve.coordinator.engine import Engine
from moeserve.coordinator.outputs import RequestOutput
from moeserve.coordinator.request import RequestError, RequestStatus
from moeserve.coordinator.sampling import SamplingParams


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
    kv_tiers: dict = field(default_factory=dict)  # host tier and store counters (TierManager.snapshot)

    @classmethod
    def of(cls, engine: Engine) -> EngineSnapshot:
        kv = engine.kv
        tiers = getattr(kv, "tiers", None)
        return cls(len(engine.scheduler.running), len(engine.scheduler.waiting),
                   kv.num_blocks - kv.num_free_blocks, kv.num_blocks,
                   int(getattr(kv, "num_prefix_hit_tokens", 0)), int(getattr(kv, "num_prefix_query_tokens", 0)),
                   len(engine.requests), tiers.snapshot() if tiers is not None else {})


class ExpertTracer:
    """Wraps a single-process ``ModelRunner`` to keep, after each step, the routed expert ids of the sampled
    positions: ``last`` is [sample rows, moe layers, top_k] (a sampled row's expert ids are those its last
    position was routed to in the forward pass that produced the token). Distributed runners are not wrapped:
    stage workers do not return traces yet."""

    def __init__(self, runner: Any, model: Any):
        self._runner = runner
        self._moe = list(model.moe_layers().values())
        self.enabled = False
        self.last: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def submit(self, plan: Any, prev_token_ids: torch.Tensor | None = None) -> Any:
        """The engine's interface to a single-process runner. While tracing, the engine steps synchronously
        (``Engine.sync_steps``), so the trace of the latest submit belongs to the batch it finishes next."""
        handle = self._runner.submit(plan, prev_token_ids)
        self._record(plan)
        return handle

    def execute(self, plan: Any, prev_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = self._runner.execute(plan, prev_token_ids)
        self._record(plan)
        return logits

    def _record(self, plan: Any) -> None:
        self.last = None
        if self.enabled and self._moe:
            ends = torch.tensor(plan.query_lens).cumsum(0) - 1  # [B] last position of each sequence
            rows = ends[torch.tensor(plan.sample_rows, dtype=torch.long)]
            self.last = torch.stack([m.last_expert_ids[rows.to(m.last_expert_ids.device)].cpu()
                                     for m in self._moe], dim=1)


Publish = Callable[[list[tuple[str, "EngineUpdate | Exception"]]], None]


class EngineDriver:
    """The engine loop's body, without threads: commands in, batches of updates out through ``publish``."""

    def __init__(self, engine: Engine, publish: Publish):
        self.engine = engine
        self.publish = publish
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.tracer: ExpertTracer | None = None
        if engine.model is not None:
            self.tracer = ExpertTracer(engine.runner, engine.model)
            engine.runner = self.tracer  # type: ignore[assignment]
        self._arrival: dict[str, float] = {}  # requests not yet scheduled -> engine arrival time
        self._traced: set[str] = set()
        self.snapshot = EngineSnapshot.of(engine)
        self.fatal: Exception | None = None  # a stage worker died: the engine cannot step any more

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
            self.step()                                             # 2-3. step and publish
        self.snapshot = EngineSnapshot.of(self.engine)              # 4. stats

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
        if self.tracer is not None:
            self.tracer.enabled = self.engine.sync_steps = bool(self._traced)
        t0 = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a failed step fails every request in flight
            self.fail_all(e)
            if self.engine.workers_failed(e):
                self.fatal = e
            return
        started = [rid for rid in self._arrival
                   if (r := self.engine.requests.get(rid)) is None or r.status is not RequestStatus.WAITING]
        queue_s = {rid: t0 - self._arrival.pop(rid) for rid in started}
        trace = self.tracer.last if self.tracer is not None else None
        if trace is not None and trace.shape[0] != len(outputs):
            trace = None  # NOTE: outputs follow the sample rows of the step; if not, no trace this step
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
        """Between steps: notice a stage worker that died while the engine was idle."""
        try:
            self.engine.check_workers()
        except Exception as e:  # noqa: BLE001 - the same path as a failed step
            self.fail_all(e)
            self.fatal = e

    def fail_all(self, error: Exception) -> None:
        rids = list(self.engine.requests)
        for rid in rids:
            self.engine.abort(rid)
            self._forget(rid)
        self.publish([(rid, RuntimeError(f"engine step failed: {error}")) for rid in rids])


async def updates_until_finished(queue: asyncio.Queue, forget: Callable[[], object],
                                 abort: Callable[[], object]) -> AsyncGenerator[EngineUpdate, None]:
    """Yield one request's updates from ``queue`` until the finished one; an Exception item is raised.
    Always ``forget`` the stream at the end, and ``abort`` the request when its consumer stopped early."""
    finished = False
    try:
        while not finished:
            item = await queue.get()
            if isinstance(item, Exception):
                finished = True
                raise item
            finished = item.output.finished
            yield item
    finally:
        forget()
        if not finished:
            abort()


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.driver = EngineDriver(engine, self._publish)
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_fatal: Callable[[Exception], None] | None = None  # called on the event loop

    async def __aenter__(self) -> AsyncEngine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def snapshot(self) -> EngineSnapshot:
        return self.driver.snapshot

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    # ---- the engine thread ----
    def _run(self) -> None:
        while not self._stopping and self.driver.fatal is None:
            if not self.driver.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                self.driver.check_workers()
                continue
            self.driver.run_once()
        if self.driver.fatal is not None and self.on_fatal is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_fatal, self.driver.fatal)

    def _publish(self, batch: list[tuple[str, EngineUpdate | Exception]]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, batch)  # one hop per step, not per request
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _deliver(self, batch: list[tuple[str, EngineUpdate | Exception]]) -> None:
        for rid, item in batch:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(item)

    # ---- the asyncio side ----
    async def stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     trace_experts: bool = False) -> AsyncIterator[EngineUpdate]:
        """Stream the updates of one request. Raises RequestError at once for a request that cannot run."""
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.engine._validate(prompt_token_ids, params)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self.driver.add(request_id, list(prompt_token_ids), params, trace_experts)
        self._wake.set()
        async with aclosing(updates_until_finished(stream, lambda: self._streams.pop(request_id, None),
                                                   lambda: self.abort(request_id))) as updates:
            async for item in updates:  # closed at once (the abort runs) when our consumer stops early
                yield item

    async def generate(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                       params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request. Raises RequestError at once for a request that cannot run."""
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None or self.engine.tokenizer is None:
                raise RequestError("a request needs prompt_token_ids, or a prompt and a tokenizer")
            prompt_token_ids = self.engine.tokenizer.encode(prompt)
        async for update in self.stream(request_id, prompt_token_ids, params):
            yield update.output

    def abort(self, request_id: str) -> None:
        self.driver.abort(request_id)
        self._wake.set()
