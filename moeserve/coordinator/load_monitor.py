"""ExpertLoadMonitor: the engine's part of expert-load statistics -- when to ask the ranks, and where the
answers go (``LoadAggregator``). One per engine; the engine thread calls ``on_step`` and ``idle``."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from moeserve.comm.messages import ExpertLoadMsg, MessageError
from moeserve.coordinator.expert_load import LoadAggregator, LoadView
from moeserve.coordinator.rebalancer import EplbConfig, Rebalancer
from moeserve.model.config import ModelConfig

if TYPE_CHECKING:
    from moeserve.coordinator.executor import Executor

logger = logging.getLogger(__name__)


def moe_layer_ids(config: ModelConfig) -> tuple[int, ...]:
    return tuple(i for i in range(config.num_hidden_layers) if config.is_moe_layer(i))


class ExpertLoadMonitor:
    """Every ``interval`` steps ask every rank for its counters (``Executor.request_expert_load``); the
    answers come back through ``receive`` while the engine runs later steps, so the step that asks waits for
    nothing. The window closes at the step that asked, once every rank has answered."""

    def __init__(self, executor: Executor, config: ModelConfig, interval: int,
                 phy2log: torch.Tensor | None = None, eplb: EplbConfig | None = None):
        """``eplb``: rebalance the placement online (with expert parallelism, ``phy2log`` given, only)."""
        if interval < 1:
            raise ValueError(f"the expert-load interval must be >= 1 step, got {interval}")
        self.interval = interval
        self.aggregator = LoadAggregator(moe_layer_ids(config), config.n_routed_experts, phy2log)
        self.executor = executor
        executor.sinks[ExpertLoadMsg] = self.receive
        self.step = 0
        self._steps_since_request = 0
        self._seq = 0
        self._asked_at = 0  # the step the pending request was made at
        self._pending: set[int] = set()
        self.rebalancer: Rebalancer | None = None
        if eplb is not None and phy2log is not None and self.enabled:
            self.rebalancer = Rebalancer(executor, self.aggregator, eplb)
            self.rebalancer.on_swap = self._placement_changed

    @property
    def view(self) -> LoadView | None:
        return self.aggregator.view

    @property
    def enabled(self) -> bool:
        return bool(self.aggregator.layer_ids)

    def on_step(self, step: int) -> None:
        self.step = step
        self._steps_since_request += 1
        if not self.enabled:
            return
        if self._pending:
            self.executor.poll_messages()  # answers that have arrived (one process: a copy that has landed)
        if self._steps_since_request >= self.interval and not self._pending:
            self.request()
        if self.rebalancer is not None:
            self.rebalancer.on_step(step)

    def _placement_changed(self) -> None:
        """Answers to a request sent before the swap count the old slots: ignore them."""
        self._seq += 1
        self._pending.clear()

    def idle(self) -> None:
        """Between steps with nothing to run: take the answers that came in, close a window left open."""
        if not self.enabled:
            return
        self.executor.poll_messages()
        if self._steps_since_request and not self._pending:
            self.request()
        if self.rebalancer is not None and (self.rebalancer.staging or self.rebalancer.requested):
            self.rebalancer.on_step(self.step)

    def flush(self, timeout_s: float = 60.0) -> LoadView | None:
        """Close a window now and wait for every rank's answer (tests, and callers between steps)."""
        if not self.enabled:
            return self.view
        self._wait_for_answers(timeout_s)  # to a request in flight
        self.request()
        self._wait_for_answers(timeout_s)
        return self.view

    def _wait_for_answers(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(self._pending)} did not send their expert load")
            self.executor.poll_messages()
            time.sleep(0.001)

    def request(self) -> None:
        self._steps_since_request = 0
        self._seq += 1
        self._asked_at = self.step
        self._pending = set(range(self.executor.num_ranks))
        self.executor.request_expert_load(self._seq)

    def receive(self, msg: ExpertLoadMsg) -> None:
        """A rank's answer (called by the executor while it waits for logits)."""
        if msg.seq != self._seq or msg.rank not in self._pending:
            return  # an answer to a request from before a placement change
        self._pending.discard(msg.rank)
        try:
            logical, physical = msg.tensors()
        except MessageError as e:
            logger.warning("rank %d sent bad expert-load counters: %s", msg.rank, e)
        else:
            self.aggregator.update(msg.rank, msg.layer_ids, logical, physical)
        if not self._pending:
            self.aggregator.close_window(self._asked_at)
