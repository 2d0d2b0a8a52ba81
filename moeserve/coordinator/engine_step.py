"""The step of an Engine (engine.py), on its own: its phases, the batches in flight, and async scheduling.

``step()`` reads as its phases, each one named call and one timing block (``EngineStats.phase_s``):
schedule -> launch -> collect -> sample -> advance -> wait -> process. With async scheduling a step
schedules and launches batch N+1 while the device still runs batch N -- N's sampled ids reach N+1's inputs
on the device (``StepPlan.pending_rows``) -- and only then waits for N's ids on the host and processes N's
outputs. A request that finished at N has one more token computed at N+1: it is discarded (no output), and
its blocks are already free (the device writes that token before any later batch reuses them).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.load_monitor import ExpertLoadMonitor
from moeserve.coordinator.outputs import OutputProcessor, RequestOutput
from moeserve.coordinator.request import Request, RequestStatus
from moeserve.coordinator.sampling import Sampler
from moeserve.coordinator.scheduler import Scheduler
from moeserve.coordinator.spec_decode import Speculator
from moeserve.coordinator.spec_policy import SpecPolicy
from moeserve.coordinator.step_batch import EngineStats, SamplingBatchCache, StepBatch, build_step_plan
from moeserve.device_copy import HostCopy, to_device
from moeserve.kvstore.cache_manager import KVCacheManager
from moeserve.kvstore.disagg import KvTransferParams, PrefillSide

if TYPE_CHECKING:
    from moeserve.coordinator.executor import Executor

logger = logging.getLogger(__name__)


class EngineStep:
    """The part of ``Engine`` that runs steps. The Engine builds every attribute declared here."""

    config: EngineConfig
    executor: Executor  # runs the steps on the replica's ranks (coordinator/executor.py)
    scheduler: Scheduler
    kv: KVCacheManager
    sampler: Sampler
    sampling_batches: SamplingBatchCache  # the last step's sampling batch, reused while it still applies
    outputs: OutputProcessor
    expert_load: ExpertLoadMonitor
    requests: dict[str, Request]
    stats: EngineStats
    max_model_len: int
    pipeline_depth: int  # batches in flight: pp with pipeline-parallel stage workers, else 1
    in_flight: deque[StepBatch]  # launched, not yet processed (oldest first)
    async_scheduling: bool
    # set by a caller that reads the executor's state of each step right after it (the expert tracer of
    # async_engine.py): steps then run synchronously
    sync_steps: bool
    _sync_request_ids: set[str]  # requests whose sampling reads their outputs so far
    _step_start: float
    _processed: list[RequestOutput]  # this step's outputs once processed (a failure after them keeps them)
    prefill_side: PrefillSide | None  # a prefill instance's held blocks and transfer server
    speculator: Speculator | None  # MTP speculative decoding (spec_decode.py); None: off
    spec_policy: SpecPolicy | None

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of the batch it finishes.

        Synchronously: schedule and launch batches until ``pipeline_depth`` are in flight, then finish the
        oldest. With async scheduling, unless a request's sampling reads its outputs so far (penalties,
        grammars) or ``sync_steps`` is set: schedule and launch batch N+1 (its sampling queued behind it)
        while the device still runs batch N, then finish N; the step that leaves this mode finishes the
        batch in flight first."""
        self._step_start = time.perf_counter()
        self._processed = []
        try:
            if self.speculator is not None:
                outputs = self._step_speculative()
            elif self._can_overlap():
                outputs = self._step_overlapped()
            elif self.in_flight and self.in_flight[0].is_sampled:  # launched by an overlapped step
                outputs = self._finish(self.in_flight.popleft())
            else:
                self._fill_pipeline()
                outputs = self._finish(self.in_flight.popleft()) if self.in_flight else []
        except BaseException:
            self.in_flight.clear()  # a failed step's batches are gone; the caller fails their requests
            raise
        self._kv_step_end()
        return outputs

    def _kv_step_end(self) -> None:
        """The KV loads and saves no batch has carried yet go to the ranks; with nothing else to run, wait
        briefly for a load to finish. A prefill instance frees the blocks decode instances have pulled."""
        if self.prefill_side is not None:
            for blocks in self.prefill_side.held.take_released():
                self.kv.release(blocks)
        connector = self.kv.connector
        if connector is None:
            return
        connector.send_ops()
        if not self.in_flight and self.scheduler.loading and not self.scheduler.running:
            connector.wait(0.05)

    def _step_speculative(self) -> list[RequestOutput]:
        raise NotImplementedError("the speculative step is SpeculativeStep's (engine_spec_step.py)")

    def _can_overlap(self) -> bool:
        return self.async_scheduling and not self.sync_steps and not self._sync_request_ids

    def _step_overlapped(self) -> list[RequestOutput]:
        prev = self.in_flight.popleft() if self.in_flight else None
        with self.stats.phase("schedule"):
            batch = self._schedule(prev)                    # 1. batch N+1: N's sampled tokens are placeholders
        if batch is not None:
            with self.stats.phase("launch"):
                self._launch(batch, prev)                   # 2. N's ids go into N+1's inputs on the device
            self._sample(batch)                             # 3. queued behind it; its copy to the host starts
            self.in_flight.append(batch)
        outputs = self._finish(prev) if prev is not None else []  # 4. N's outputs, while the device runs N+1
        if batch is not None:
            with self.stats.phase("advance"):
                self.scheduler.advance(batch.sched)         # 5. N+1's tokens count as computed
        return outputs

    def _fill_pipeline(self) -> None:
        """Schedule and launch batches until ``pipeline_depth`` are in flight or nothing more can run now.

        With several in flight, each takes about 1/depth of the unfinished requests, so that the stages of
        the pipeline work on different batches at the same time."""
        while len(self.in_flight) < self.pipeline_depth:
            with self.stats.phase("schedule"):
                busy = frozenset(s.request.request_id for b in self.in_flight for s in b.sched.scheduled)
                cap = None
                if self.pipeline_depth > 1:
                    unfinished = len(self.scheduler.running) + len(self.scheduler.waiting)
                    cap = max(1, math.ceil(unfinished / self.pipeline_depth))
                batch = self._schedule(None, busy, cap)
            if batch is None:
                return
            with self.stats.phase("launch"):
                self._launch(batch, None)
            self.in_flight.append(batch)
            self.stats.max_in_flight = max(self.stats.max_in_flight, len(self.in_flight))

    def _schedule(self, prev: StepBatch | None, busy: frozenset[str] = frozenset(),
                  cap: int | None = None) -> StepBatch | None:
        """The next batch and its plan; each request it samples counts one more output placeholder."""
        sched = self.scheduler.schedule(busy, cap)
        if sched.is_empty:
            return None
        plan = build_step_plan(sched, prev)
        plan.wait_loads = self.kv.wait_loads([s.request.request_id for s in sched.scheduled])
        to_sample = [sched.scheduled[i].request for i in plan.sample_rows]
        for req in to_sample:
            req.num_output_placeholders += 1
        return StepBatch(sched, plan, to_sample)

    def _launch(self, batch: StepBatch, prev: StepBatch | None) -> None:
        if self.kv.connector is not None:  # this step's loads and saves reach the ranks ahead of its plan
            self.kv.connector.send_ops()
        batch.handle = self.executor.submit(batch.plan, prev.token_ids if prev is not None else None)

    def _sample(self, batch: StepBatch) -> None:
        """Collect the batch's logits and sample its rows on the device (rows of requests that finished or
        were aborted meanwhile are dropped); the sampled ids' copy to the host starts."""
        with self.stats.phase("collect"):
            logits = self.executor.collect(batch.handle).to(self.config.torch_device).float()
            batch.handle = None
            if batch.plan.wait_loads:  # layer-wise loads under it: a short one drops its request's rows
                self.scheduler.confirm_loads(batch.sched)
        with self.stats.phase("sample"):
            reqs = batch.to_sample
            live = [i for i, r in enumerate(reqs) if r.status is RequestStatus.RUNNING]
            if len(live) < len(reqs):
                logits = logits[to_device(torch.tensor(live, dtype=torch.long), logits.device)]
                reqs = [reqs[i] for i in live]
            params = self.sampling_batches.get(reqs, logits.device, self.outputs.eos_token_ids,
                                               self.outputs.bitmask(reqs), bool(self._sync_request_ids))
            out = self.sampler.sample(logits, params)
            batch.sampled_reqs, batch.token_ids = reqs, out.token_ids
            batch.host = HostCopy([out.token_ids, out.logprobs, *(out.top_logprobs or ())])

    def _finish(self, batch: StepBatch) -> list[RequestOutput]:
        """Sample and advance the batch if a synchronous step, then wait for its ids and process them."""
        if not batch.is_sampled:
            self._sample(batch)
            with self.stats.phase("advance"):
                self.scheduler.advance(batch.sched)
        assert batch.host is not None
        with self.stats.phase("wait"):
            host = batch.host.wait()
        with self.stats.phase("process"):
            outputs = self._processed = self._process(batch.sampled_reqs, host)
        self._record(batch, len(outputs))
        return outputs

    def _process(self, reqs: list[Request], host: list[torch.Tensor]) -> list[RequestOutput]:
        """Outputs of the sampled rows (``host``: token ids, logprobs[, top values, top ids]); a request that
        finished at the batch before gets none (with async scheduling its extra token is discarded)."""
        for req in reqs:
            req.num_output_placeholders -= 1
        top = (host[2].tolist(), host[3].tolist()) if len(host) > 2 else None
        outputs = self.outputs.process_batch(reqs, host[0].tolist(), host[1].tolist(), top, time.monotonic(),
                                             self.max_model_len)
        for out in outputs:
            if out.finished:
                self._retire(self.requests[out.request_id])
        return outputs

    def _record(self, batch: StepBatch, num_outputs: int) -> None:
        sched, seconds = batch.sched, time.perf_counter() - self._step_start
        self.stats.num_steps += 1
        self.stats.num_preemptions += len(sched.preempted)
        self.stats.num_generated_tokens += num_outputs
        self.stats.step_times.append(seconds)
        if self.kv.connector is not None:  # the cost rule's prefill speed
            self.kv.connector.observe_step(sched.num_batched_tokens, seconds)
        self.expert_load.on_step(self.stats.num_steps)
        if sched.preempted:
            logger.info("preempted %d request(s) (cache full); they will be recomputed", len(sched.preempted))

    def _retire(self, req: Request) -> None:
        """A finished or aborted request leaves: its cache blocks are free at once. (A batch in flight may
        still compute one token for it: that token is discarded, and the device writes it before any later
        batch can reuse the blocks.) A prefill instance holds a finished request's prompt blocks for the pull."""
        if self.prefill_side is not None and req.params.kv_transfer and req.finish_reason != "abort":
            transfer_id = KvTransferParams.from_json(req.params.kv_transfer).transfer_id
            self.prefill_side.held.hold(transfer_id, *self.kv.hold(req.request_id, req.prompt_token_ids))
        self.scheduler.remove(req)
        self.requests.pop(req.request_id, None)
        self._sync_request_ids.discard(req.request_id)

