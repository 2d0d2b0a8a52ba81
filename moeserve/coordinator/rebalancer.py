"""Online expert rebalancing (EPLB) of a distributed engine, driven from the coordinator.

Every ``interval`` steps (or when asked: ``POST /admin/rebalance``) the rebalancer reads the load since
start, asks the planner (``experts/eplb.py``) for a placement, and starts it only when the ranks' measured
balancedness since the last rebalance is below ``threshold`` and the plan predicts at least ``hysteresis``
better (a forced rebalance skips both checks). Starting sends ``PlacementMsg`` to every rank; each stages
its changed slots a few layers per step, in the background, and answers ``PlacementReadyMsg``. When all have
answered, the rebalancer sends ``PlacementSwapMsg`` between two step plans, so every rank serves the new
routing map from the same step on. A rank that fails to stage leaves every rank on the old placement.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeserve.comm.messages import PlacementMsg, PlacementReadyMsg, PlacementSwapMsg
from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.expert_load import LoadAggregator, Rebalance
from moeserve.experts.eplb import balancedness, num_moves, plan_placement, rank_loads

if TYPE_CHECKING:
    from moeserve.coordinator.executor import Executor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EplbConfig:
    interval: int = 0  # steps between checks; 0 = only when asked
    threshold: float = 0.9  # rebalance when the measured balancedness falls below this
    hysteresis: float = 0.05  # ... and the plan predicts at least this much better
    layers_per_step: int = 4  # MoE layers each rank stages after a step

    @classmethod
    def of(cls, config: EngineConfig) -> EplbConfig:
        return cls(config.eplb_interval, config.eplb_threshold, config.eplb_hysteresis, config.eplb_layers_per_step)


def with_redundant_slots(config: EngineConfig, num_experts: int) -> EngineConfig:
    """With ``num_redundant_experts`` and no placement file, write the planner's placement for an even load
    (every rank ``(E + R) / ep`` slots) and point the config at it."""
    if not config.num_redundant_experts or config.expert_placement or not num_experts or not config.is_distributed:
        return config
    ep = config.parallel_dims.ep
    slots, rest = divmod(num_experts + config.num_redundant_experts, ep)
    if rest or ep < 2:
        raise ValueError(f"n_routed_experts ({num_experts}) + num_redundant_experts "
                         f"({config.num_redundant_experts}) must split evenly over ep ({ep}) >= 2 ranks")
    phy2log = plan_placement(torch.ones(1, num_experts), ep, slots)[0].tolist()
    path = Path(tempfile.mkdtemp(prefix="moeserve-placement-")) / "placement.json"
    path.write_text(json.dumps({"phy2log": phy2log}))
    return dataclasses.replace(config, expert_placement=str(path))


class Rebalancer:
    def __init__(self, executor: Executor, aggregator: LoadAggregator, config: EplbConfig):
        self.executor, self.aggregator, self.config = executor, aggregator, config
        executor.sinks[PlacementReadyMsg] = self.receive
        aggregator.eplb_interval_steps = config.interval
        self.requested = False  # set from another thread (HTTP); read by the engine thread
        self.step = 0
        self._steps_since_check = 0
        self._seq = 0
        self._pending: set[int] = set()
        self._errors: list[str] = []
        self._staging: tuple[torch.Tensor, float, float, float] | None = None  # plan, start, before, after
        self.on_swap = lambda: None  # the load monitor restarts its window

    @property
    def staging(self) -> bool:
        return self._staging is not None

    def request(self) -> None:
        self.requested = True

    def on_step(self, step: int) -> None:
        self.step = step
        if self._staging is not None:
            if not self._pending:
                self._finish()
            return
        self._steps_since_check += 1
        due = self.config.interval and self._steps_since_check >= self.config.interval
        if self.requested or due:
            self.consider(force=self.requested)

    def consider(self, force: bool = False) -> bool:
        """Plan, and start the new placement if it is worth it; True when one was started."""
        self.requested, self._steps_since_check = False, 0
        view, current = self.aggregator.view, self.aggregator.phy2log
        if view is None or current is None or int(view.total.sum()) == 0:
            return False
        weight = view.total.sum(1).sum(0, keepdim=True).double()  # [1, E]: one placement for every layer
        measured = float(view.balancedness("placement").mean())  # since the current placement began
        new = plan_placement(weight, current.shape[0], current.shape[1], current=current.unsqueeze(0))[0]
        now = float(balancedness(rank_loads(weight, current.unsqueeze(0)))[0])
        after = float(balancedness(rank_loads(weight, new.unsqueeze(0)))[0])
        worth = measured < self.config.threshold and after - now >= self.config.hysteresis
        if num_moves(current, new) == 0 or not (force or worth):
            self._record("skipped", 0.0, measured, after)
            return False
        self._seq += 1
        self._pending = set(range(self.executor.num_ranks))
        self._errors = []
        self._staging = (new, time.monotonic(), measured, after)
        logger.info("rebalancing experts: balancedness %.3f -> %.3f predicted, %d slots move", measured, after,
                    num_moves(current, new))
        self.executor.broadcast(PlacementMsg(self._seq, new.tolist(), self.config.layers_per_step))
        return True

    def receive(self, msg: PlacementReadyMsg) -> None:
        if msg.seq != self._seq:
            return
        self._pending.discard(msg.rank)
        if msg.error:
            self._errors.append(f"rank {msg.rank}: {msg.error}")

    def _finish(self) -> None:
        assert self._staging is not None
        new, start, before, after = self._staging
        self._staging = None
        if self._errors:
            logger.warning("expert rebalance abandoned (every rank keeps the old placement): %s", self._errors)
            self._record("failed", time.monotonic() - start, before, after)
            return
        self.executor.broadcast(PlacementSwapMsg(self._seq))  # between two step plans: every rank at once
        seconds = time.monotonic() - start
        self.aggregator.set_placement(new, Rebalance(time.time(), self.step, "applied", seconds, before, after))
        self.on_swap()

    def _record(self, result: str, seconds: float, before: float, after: float) -> None:
        self.aggregator.rebalances.append(Rebalance(time.time(), self.step, result, seconds, before, after))
