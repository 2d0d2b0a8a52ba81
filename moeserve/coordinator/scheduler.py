"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Each step: (1) running requests, oldest first, get their next tokens (one for decode, a chunk for an
unfinished prefill); when the cache is full the newest running request is preempted -- its blocks freed, its
progress dropped, and it goes back to the head of the queue to be recomputed later; (2) waiting requests are
admitted, oldest first, while the token budget, ``max_num_seqs`` and free blocks allow. A request that fits
the whole cache alone always makes progress, so the loop never deadlocks.

With pipeline parallelism the engine keeps several batches in flight: ``schedule(busy=...)`` leaves out the
requests of those batches (never scheduling or preempting them) and can cap the batch size, so the running
requests split into interleaved batches. Once no batch is in flight the single-batch guarantee above holds.

A request whose prefix the KV connector can load (host tier, store, a prefill instance) waits in ``loading``,
holding its blocks, while the ranks load them; once they are in it goes back to the head of the queue. With
``layerwise`` it is scheduled at once instead, its loaded prefix counted as computed: the step's plan lists the
load, each layer waits on the ranks for its own blocks, and once the step is collected ``confirm_loads`` waits
for the load's report; a short load rolls the request back (the step's token for it is dropped, and it is
recomputed from the blocks that did arrive, which are cached by then).

With async scheduling the engine schedules the next batch before the last one's sampled ids reach the host:
a request counts those tokens as ``num_output_placeholders``, so that it is scheduled to decode the token
still on the device (the runner fills it in there); one sure to stop at that token (it reaches max_tokens) is
not scheduled again.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from moeserve.coordinator.request import Request, RequestStatus
from moeserve.kvstore.cache_manager import BlockTable, KVCacheManager


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # slots held past a request's scheduled tokens (speculative decoding: where chained drafts are written)
    num_lookahead_tokens: int = 0
    layerwise: bool = False  # KV loads that can be layer-wise are (the request is scheduled at once)

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # including the draft tokens
    block_table: BlockTable
    num_spec_tokens: int = 0  # draft tokens verified by this step (the last ones of num_new_tokens)
    num_rejected_tokens: int = 0  # set once verified: draft tokens whose latents are not kept

    @property
    def completes_sequence(self) -> bool:
        """True when this chunk reaches the request's last token, so a new token is sampled after it."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens - self.num_spec_tokens == r.num_tokens_with_placeholders


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # decodes (one new token) first
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: dict[str, Request] = {}  # waiting for their prefix's blocks (KV connector)
        self._loaded: set[str] = set()  # requests that had a load since admission (or preemption): no second
        self._unconfirmed: dict[str, bool | None] = {}  # scheduled on a layer-wise load -> complete? (None: running)
        self.num_rolled_back = 0  # steps dropped for a request because its layer-wise load came short

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request and free its blocks at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.loading.pop(request.request_id, None)
        self._loaded.discard(request.request_id)
        self._unconfirmed.pop(request.request_id, None)
        self.kv.free(request.request_id)

    def _slots(self, req: Request, num_new: int) -> int:
        """The cache slots a request holds once ``num_new`` tokens are scheduled: with lookahead, a few more
        (never past the most tokens it can hold)."""
        need = req.num_computed_tokens + num_new
        if not self.config.num_lookahead_tokens:
            return need
        return max(need, min(need + self.config.num_lookahead_tokens, req.max_total_tokens))

    def _preempt_newest(self, out: SchedulerOutput, busy: frozenset[str]) -> Request:
        """Free the newest running request that is not in a batch still in flight. The request being
        scheduled is such a request, so there always is one, and it stands at or after that request."""
        idx = next(i for i in range(len(self.running) - 1, -1, -1) if self.running[i].request_id not in busy)
        victim = self.running.pop(idx)
        self.kv.free(victim.request_id)
        self._loaded.discard(victim.request_id)
        victim.num_computed_tokens = 0
        victim.spec_token_ids, victim.spec_probs = [], None
        victim.num_preemptions += 1
        victim.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        return victim

    def _schedule_running(self, out: SchedulerOutput, budget: int, busy: frozenset[str], max_seqs: int) -> int:
        # NOTE: the hot loop of every step, once per running request: sizes are read from attributes and
        # len() once each, not through Request's properties, and a decode without lookahead allocates its
        # slots directly (what ``_slots`` and ``_stops_in_flight`` compute)
        allocate = self.kv.allocate_slots
        lookahead = self.config.num_lookahead_tokens
        scheduled, running = out.scheduled, self.running
        i = 0
        while i < len(running) and budget > 0 and len(scheduled) < max_seqs:
            req = running[i]
            i += 1
            placeholders = req.num_output_placeholders
            num_tokens = len(req.token_ids) + placeholders  # num_tokens_with_placeholders
            if (busy and req.request_id in busy) or (placeholders and num_tokens >= req.max_total_tokens):
                continue
            num_known = num_tokens - req.num_computed_tokens
            num_spec = len(req.spec_token_ids) if num_known == 1 else 0  # drafts ride on a decode only
            num_new = min(num_known + num_spec, budget)
            num_spec = max(0, num_new - num_known)
            slots = req.num_computed_tokens + num_new if not lookahead else self._slots(req, num_new)
            table = allocate(req.request_id, slots)
            while table is None:
                if self._preempt_newest(out, busy) is req:
                    return budget
                table = allocate(req.request_id, self._slots(req, num_new))
            scheduled.append(ScheduledRequest(req, num_new, table, num_spec))
            budget -= num_new
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, max_seqs: int) -> None:
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(out.scheduled) < max_seqs):
            req = self.waiting[0]
            assert not req.num_output_placeholders, "a waiting request's last outputs are processed"
            if req.num_computed_tokens == 0 and not self.kv.holds(req.request_id):
                req.num_computed_tokens = self.kv.match_prefix(req.request_id, req.token_ids)  # cached prefix
                if req.request_id not in self._loaded and self.kv.start_load(
                        req.request_id, req.token_ids, req.params.kv_transfer, self.config.layerwise):  # and a load
                    self._loaded.add(req.request_id)
                    if not self.kv.is_layerwise(req.request_id):
                        self.loading[req.request_id] = self.waiting.popleft()
                        continue
                    self._unconfirmed[req.request_id] = None  # scheduled now, over the load
                    req.num_computed_tokens = self.kv.num_held_tokens(req.request_id)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            table = self.kv.allocate_slots(req.request_id, self._slots(req, num_new))
            if table is None:
                self.kv.free(req.request_id)  # give back the cached prefix; it is matched again next time
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new, table))
            budget -= num_new

    def schedule(self, busy: frozenset[str] = frozenset(), max_seqs: int | None = None) -> SchedulerOutput:
        """Pick the next batch. ``busy``: ids of requests in batches still in flight (pipeline parallelism),
        which are neither scheduled nor preempted; ``max_seqs``: a cap on this batch's sequences."""
        out = SchedulerOutput()
        self._take_loaded()
        cap = min(max_seqs or self.config.max_num_seqs, self.config.max_num_seqs)
        budget = self._schedule_running(out, self.config.max_num_batched_tokens, busy, cap)
        if not out.preempted:  # a step that had to preempt admits nobody new
            self._schedule_waiting(out, budget, cap)
        if any(s.num_new_tokens != 1 for s in out.scheduled):  # stable: decodes (with drafts or not) first
            out.scheduled.sort(key=lambda s: s.num_new_tokens - s.num_spec_tokens != 1)
        return out

    def _take_loaded(self) -> None:
        """Requests whose loads are done go back to the head of the queue, oldest first; how a layer-wise load
        ended is kept for ``confirm_loads``."""
        waited = []
        for done in self.kv.finish_loads():
            if done.layerwise:
                if done.request_id in self._unconfirmed:
                    self._unconfirmed[done.request_id] = done.complete
            else:
                waited.append(done)
        for done in sorted(waited, key=lambda d: self.loading[d.request_id].arrival_time, reverse=True):
            req = self.loading.pop(done.request_id)
            req.num_computed_tokens = done.num_cached_tokens
            self.waiting.appendleft(req)

    def confirm_loads(self, out: SchedulerOutput, timeout_s: float = 300.0) -> None:
        """After a step that read layer-wise loads ran (its logits are collected, so every rank has passed its
        last layer, and every load under it has ended): wait for the loads' reports. A request whose load was
        short is rolled back: it leaves ``running``, its blocks are freed (those that arrived are cached), and it
        goes back to the head of the queue to be recomputed. Its rows in this step are then neither sampled nor
        advanced (its status is no longer RUNNING)."""
        ids = [s.request.request_id for s in out.scheduled if s.request.request_id in self._unconfirmed]
        deadline = time.monotonic() + timeout_s
        while any(self._unconfirmed[i] is None for i in ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"layer-wise KV loads of {ids} not reported within {timeout_s:.0f} s")
            self.kv.wait_for_loads(0.005)
            self._take_loaded()
        for s in out.scheduled:
            req = s.request
            if self._unconfirmed.pop(req.request_id, True) or req.status is not RequestStatus.RUNNING:
                continue
            self.running.remove(req)
            self.num_rolled_back += 1
            self.kv.free(req.request_id)
            req.num_computed_tokens = 0
            req.num_output_placeholders = 0
            req.status = RequestStatus.PREEMPTED
            self.waiting.appendleft(req)

    def advance(self, out: SchedulerOutput) -> None:
        """Record that the scheduled tokens were computed (a request finished meanwhile is skipped: with async
        scheduling, the token it was scheduled for is discarded).

        Every computed token must be known on the host by now (full blocks are registered by their tokens):
        the engine advances a batch after processing the outputs of the batch before it."""
        block_size = self.kv.block_size
        for s in out.scheduled:
            req = s.request
            if req.status is not RequestStatus.RUNNING:  # finished, or rolled back (confirm_loads)
                continue
            before = req.num_computed_tokens
            req.num_computed_tokens += s.num_new_tokens - s.num_rejected_tokens
            assert req.num_computed_tokens <= len(req.token_ids), "a computed token is still a placeholder"
            if req.num_computed_tokens // block_size != before // block_size:  # NOTE: only then a block filled
                self.kv.cache_full_blocks(req.request_id, req.token_ids, req.num_computed_tokens)


def _stops_in_flight(req: Request) -> bool:
    """Whether a token still on the device is sure to be the request's last (it reaches max_tokens; the
    prompt and max_tokens fit the context, so max_model_len stops no request earlier)."""
    return req.num_output_placeholders > 0 and req.num_tokens_with_placeholders >= req.max_total_tokens
