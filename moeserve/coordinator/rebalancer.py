"""Online expert rebalancing (EPLB) of a distributed engine, driven from the coordinator, layer by layer.

Every ``interval`` steps (or when asked: ``POST /admin/rebalance``) the rebalancer reads the load since
start and asks the planner (``experts/eplb.py``) for each MoE layer's own placement, as DeepSeek's EPLB
does -- for the layers that qualify only, in a thread of its own (the engine keeps stepping; the moves are
queued at the first step after the plan is ready). A layer moves only when it is worth it (a forced
rebalance moves every layer whose plan differs):

- its balancedness measured since its current placement began is below ``threshold``, over at least
  ``min_pairs_per_slot`` pairs per physical slot; and
- its predicted gain -- how much faster its heaviest rank gets, ``max_now / max_after - 1`` on the same
  counts -- is at least ``hysteresis``. The plan of a layer that has just moved predicts no gain from the
  counts that chose it, so it does not move back (no thrash by construction); and
- it is not backing off: once a moved layer has served ``min_pairs_per_slot`` pairs per slot, its measured
  balancedness is compared with the one before the move; a measured non-gain doubles the number of checks
  the layer sits out (1, 2, 4, ...), a gain resets it (``eplb_policy.Backoff``).

A layer's move is cut into chunks (``expert_moves.next_chunk``) so that no step waits longer than
``max_stall_s``: the chunk size starts at one slot and follows the slowest rank's measured time per slot.
Each chunk is one ``PlacementMsg`` sent in order with the step plans, at most one between two steps: every
rank of the layer's stage copies the changed slots' weights point to point from the ranks holding them and
routes with the chunk's placement from the next step on (``stages/expert_mover.py``), and answers
``PlacementReadyMsg`` with the time it took. A chunk that fails on some rank stops that layer's move (the
layer keeps the placement before the chunk).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moeserve.comm.messages import PlacementMsg, PlacementReadyMsg
from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.eplb_policy import Backoff, predicted_gain
from moeserve.coordinator.expert_load import LoadAggregator, Rebalance
from moeserve.experts.eplb import balancedness, num_moves, plan_placement, rank_loads
from moeserve.experts.expert_moves import next_chunk

if TYPE_CHECKING:
    from moeserve.coordinator.executor import Executor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EplbConfig:
    interval: int = 0  # steps between checks; 0 = only when asked
    threshold: float = 0.9  # a layer moves when its measured balancedness is below this ...
    hysteresis: float = 0.05  # ... and the plan predicts its heaviest rank at least this much faster
    max_stall_s: float = 0.02  # the longest a step may wait for one chunk of moved expert weights
    min_pairs_per_slot: int = 4  # pairs a placement must have served per physical slot before it is judged

    @classmethod
    def of(cls, config: EngineConfig) -> EplbConfig:
        return cls(config.eplb_interval, config.eplb_threshold, config.eplb_hysteresis,
                   config.eplb_max_stall_ms / 1e3)


@dataclass
class LayerMove:
    """One layer on its way to ``target`` [ep, slots]."""

    layer_id: int
    target: torch.Tensor
    before: float  # measured balancedness since the layer's placement began
    after: float  # predicted
    started: float = field(default_factory=time.monotonic)
    moves: int = 0
    chunks: int = 0
    max_stall_s: float = 0.0
    over_bound: int = 0  # chunks that held some rank up longer than the bound (a busier machine than before)


@dataclass
class Plan:
    """The planner's work for some layers (``candidates``: their indices), run off the engine thread; the
    placement does not change meanwhile (no check starts while a plan or a move is under way)."""

    candidates: list[int]
    layer_ids: tuple[int, ...]
    weight: torch.Tensor  # [C, E] the candidates' load since start
    current: torch.Tensor  # [C, ep, slots]
    measured: torch.Tensor  # [L] balancedness since each layer's placement began
    force: bool
    new: torch.Tensor | None = None
    now: torch.Tensor | None = None
    after: torch.Tensor | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            _, ep, slots = self.current.shape
            self.new = plan_placement(self.weight, ep, slots, current=self.current)
            self.now = balancedness(rank_loads(self.weight, self.current))
            self.after = balancedness(rank_loads(self.weight, self.new))
        except Exception as e:  # noqa: BLE001 - reported on the engine thread; serving goes on
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.done.set()


@dataclass
class Chunk:
    seq: int
    previous: torch.Tensor  # the layer's placement before the chunk
    slots: int
    pending: set[int]
    stalls: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Rebalancer:
    def __init__(self, executor: Executor, aggregator: LoadAggregator, config: EplbConfig):
        self.executor, self.aggregator, self.config = executor, aggregator, config
        executor.sinks[PlacementReadyMsg] = self.receive
        aggregator.eplb_interval_steps = config.interval
        self.requested = False  # set from another thread (HTTP); read by the engine thread
        self.step = 0
        self._steps_since_check = 0
        self._seq = 0
        self.queue: list[LayerMove] = []
        self.inflight: Chunk | None = None
        self.slots_per_chunk = 1  # grows to what the stall bound allows, from the measured time per slot
        self.seconds_per_slot: float | None = None
        self.backoff = Backoff(config.hysteresis / 2)
        self.judging: dict[int, int] = {}  # layer -> index in aggregator.rebalances of its latest move
        self.planning: Plan | None = None  # a plan being made off the engine thread
        self.on_swap = lambda: None  # the load monitor ignores answers that counted the old slots

    @property
    def staging(self) -> bool:
        return bool(self.queue) or self.inflight is not None or self.planning is not None

    def request(self) -> None:
        self.requested = True

    def on_step(self, step: int) -> None:
        self.step = step
        if self.planning is not None:
            if not self.planning.done.is_set():
                return
            self._planned(self.planning)
        if self.inflight is not None:
            if self.inflight.pending:
                return
            self._chunk_done()
        if self.queue:
            self._send_chunk()  # at most one chunk between two steps
            return
        self._steps_since_check += 1
        due = self.config.interval and self._steps_since_check >= self.config.interval
        if self.requested or due:
            self.consider(force=self.requested)

    def consider(self, force: bool = False) -> None:
        """Pick the layers worth planning and plan them in a thread of their own (at V3's size planning a
        layer takes tens of milliseconds: the engine thread keeps stepping); ``on_step`` queues the moves
        worth making once the plan is ready."""
        self.requested, self._steps_since_check = False, 0
        view, current = self.aggregator.view, self.aggregator.phy2log
        if view is None or current is None or int(view.total.sum()) == 0:
            return
        self._judge()
        num_layers, ep, slots = current.shape
        measured = view.balancedness("placement")
        enough = view.rank_load("placement").sum(-1) >= self.config.min_pairs_per_slot * ep * slots
        candidates = []  # NOTE: only these are planned
        for i, layer_id in enumerate(view.layer_ids):
            if force or (layer_id not in self.judging and bool(enough[i]) and float(measured[i]) < self.config.threshold
                         and not self.backoff.sits_out(layer_id)):
                candidates.append(i)
        if not candidates:
            self._record(Rebalance(time.time(), self.step, "skipped", 0.0, float(measured.mean()),
                                   float(measured.mean())))
            return
        rows = torch.tensor(candidates)
        plan = Plan(candidates, view.layer_ids, view.total.sum(1).double()[rows], current[rows].clone(), measured, force)
        self.planning = plan
        threading.Thread(target=plan.run, name="eplb-plan", daemon=True).start()

    def _planned(self, plan: Plan) -> None:
        self.planning = None
        if plan.error is not None or plan.new is None or plan.now is None or plan.after is None:
            logger.warning("planning the expert placement failed: %s", plan.error)
            return
        queued = []
        for k, i in enumerate(plan.candidates):
            gain = predicted_gain(float(plan.now[k]), float(plan.after[k]))
            if num_moves(plan.current[k], plan.new[k]) == 0 or not (plan.force or gain >= self.config.hysteresis):
                continue
            queued.append(LayerMove(plan.layer_ids[i], plan.new[k], float(plan.measured[i]), float(plan.after[k])))
        if not queued:
            self._record(Rebalance(time.time(), self.step, "skipped", 0.0, float(plan.measured.mean()),
                                   float(plan.measured.mean())))
            return
        logger.info("rebalancing experts of %d layer(s): %s", len(queued),
                    ", ".join(f"{m.layer_id}: {m.before:.3f} -> {m.after:.3f}" for m in queued))
        self.queue += queued

    def _judge(self) -> None:
        """Compare each moved layer's measured balancedness with the one before its move, once it has
        served enough pairs; a non-gain backs the layer off (exponentially), a gain clears its back-off."""
        view = self.aggregator.view
        if view is None or not self.judging:
            return
        measured = view.balancedness("placement")
        served = view.rank_load("placement").sum(-1)
        need = self.config.min_pairs_per_slot * self.aggregator.num_physical
        for layer_id, index in list(self.judging.items()):
            i = view.layer_ids.index(layer_id)
            if int(served[i]) < need:
                continue
            del self.judging[layer_id]
            record = self.aggregator.rebalances[index]
            got = float(measured[i])
            self.aggregator.rebalances[index] = dataclasses.replace(record, measured_after=got)
            if not self.backoff.judge(layer_id, record.balancedness_before, got):
                self._record(dataclasses.replace(record, time=time.time(), step=self.step, result="backed-off",
                                                 measured_after=got))

    def _send_chunk(self) -> None:
        move = self.queue[0]
        assert self.aggregator.phy2log is not None
        i = self.aggregator.layer_ids.index(move.layer_id)
        current = self.aggregator.phy2log[i]
        nxt = next_chunk(current, move.target, self.slots_per_chunk, self.aggregator.num_logical)
        self._seq += 1
        self.inflight = Chunk(self._seq, current.clone(), num_moves(current, nxt), set(range(self.executor.num_ranks)))
        self.executor.broadcast(PlacementMsg(self._seq, move.layer_id, nxt.tolist()))
        self.aggregator.set_layer_placement(move.layer_id, nxt)
        self.on_swap()

    def receive(self, msg: PlacementReadyMsg) -> None:
        chunk = self.inflight
        if chunk is None or msg.seq != chunk.seq:
            return
        chunk.pending.discard(msg.rank)
        chunk.stalls.append(msg.seconds)
        if msg.error:
            chunk.errors.append(f"rank {msg.rank}: {msg.error}")

    def _chunk_done(self) -> None:
        chunk, move = self.inflight, self.queue[0]
        assert chunk is not None
        self.inflight = None
        if chunk.errors:
            logger.warning("moving the experts of layer %d failed (it keeps its placement): %s", move.layer_id,
                           chunk.errors)
            self.aggregator.set_layer_placement(move.layer_id, chunk.previous)
            self.on_swap()
            self.queue.pop(0)
            self._record(Rebalance(time.time(), self.step, "failed", time.monotonic() - move.started, move.before,
                                   move.after, move.layer_id, move.moves, move.chunks + 1, move.max_stall_s,
                                   over_bound=move.over_bound))
            return
        stall = max(chunk.stalls, default=0.0)
        move.moves, move.chunks = move.moves + chunk.slots, move.chunks + 1
        move.max_stall_s = max(move.max_stall_s, stall)
        if stall > self.config.max_stall_s:
            move.over_bound += 1
        if chunk.slots:
            per_slot = stall / chunk.slots
            # NOTE: the slowest rank's time per slot, fixed costs included (an over-estimate for larger
            # chunks), forgotten slowly: the next chunk takes as many slots as fit 80% of the bound, never
            # fewer than one (a slot cannot be split)
            old = self.seconds_per_slot
            self.seconds_per_slot = per_slot if old is None else max(per_slot, 0.9 * old)
            self.slots_per_chunk = max(1, math.floor(0.8 * self.config.max_stall_s / max(self.seconds_per_slot, 1e-9)))
        assert self.aggregator.phy2log is not None
        i = self.aggregator.layer_ids.index(move.layer_id)
        if not torch.equal(self.aggregator.phy2log[i], move.target):
            return  # more chunks to go
        self.queue.pop(0)
        self.judging[move.layer_id] = len(self.aggregator.rebalances)
        self._record(Rebalance(time.time(), self.step, "applied", time.monotonic() - move.started, move.before,
                               move.after, move.layer_id, move.moves, move.chunks, move.max_stall_s,
                               over_bound=move.over_bound))

    def _record(self, rebalance: Rebalance) -> None:
        self.aggregator.record(rebalance)
