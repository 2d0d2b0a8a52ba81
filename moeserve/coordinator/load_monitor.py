"""ExpertLoadMonitor: the engine's part of expert-load statistics -- when to ask the ranks, and where the
answers go (``LoadAggregator``). One per engine; the engine thread calls ``on_step`` and ``idle``."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from moeserve.comm.messages import ExpertLoadMsg, MessageError
from moeserve.coordinator.expert_load import LoadAggregator, LoadView
from moeserve.coordinator.rebalancer import EplbConfig, Rebalancer
from moeserve.device_copy import HostCopy
from moeserve.model.config import ModelConfig

logger = logging.getLogger(__name__)


def moe_layer_ids(config: ModelConfig) -> tuple[int, ...]:
    return tuple(i for i in range(config.num_hidden_layers) if config.is_moe_layer(i))


class ExpertLoadMonitor:
    """Every ``interval`` steps: read the in-process runner's counters, or ask every stage worker for
    theirs (``request_expert_load``; the replies come back through ``receive`` while the engine collects
    later steps, so the step that asks waits for nothing). The in-process counters are copied to the host
    without a sync (``HostCopy``) and taken at a later step, once the copy has landed: reading them at once
    would wait for every kernel queued, including the next step's, and leave the GPU idle after."""

    def __init__(self, runner: Any, config: ModelConfig, interval: int, phy2log: torch.Tensor | None = None,
                 eplb: EplbConfig | None = None):
        """``eplb``: rebalance the placement online (a distributed engine with expert parallelism only)."""
        if interval < 1:
            raise ValueError(f"the expert-load interval must be >= 1 step, got {interval}")
        self.interval = interval
        self.aggregator = LoadAggregator(moe_layer_ids(config), config.n_routed_experts, phy2log)
        self.runner = runner
        self.distributed = hasattr(runner, "request_expert_load")
        if self.distributed:
            runner.sinks[ExpertLoadMsg] = self.receive
        self.step = 0
        self._steps_since_request = 0
        self._seq = 0
        self._pending: set[int] = set()
        self._local: tuple[HostCopy, tuple[int, ...], int] | None = None  # copy, layer ids, step asked at
        self.rebalancer: Rebalancer | None = None
        if eplb is not None and self.distributed and phy2log is not None and self.enabled:
            self.rebalancer = Rebalancer(runner, self.aggregator, eplb)
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
        self._take_local(wait=False)
        if self.enabled and self._steps_since_request >= self.interval and not self._pending \
                and self._local is None:
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
        if self.distributed:
            self.runner.poll_messages()
        self._take_local(wait=True)
        if self._steps_since_request and not self._pending:
            self.request()
            self._take_local(wait=True)
        if self.rebalancer is not None and (self.rebalancer.staging or self.rebalancer.requested):
            self.rebalancer.on_step(self.step)

    def flush(self, timeout_s: float = 60.0) -> LoadView | None:
        """Close a window now and wait for every rank's answer (tests, and callers between steps)."""
        if not self.enabled:
            return self.view
        self._take_local(wait=True)
        self.request()
        self._take_local(wait=True)
        deadline = time.monotonic() + timeout_s
        while self._pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(self._pending)} did not send their expert load")
            self.runner.poll_messages()
            time.sleep(0.01)
        return self.view

    def request(self) -> None:
        self._steps_since_request = 0
        if not self.distributed:
            counter = getattr(self.runner, "expert_load", None)
            if counter is None:
                self.aggregator.close_window(self.step)
            else:
                self._local = (HostCopy([counter.logical, counter.physical]), counter.layer_ids, self.step)
            return
        self._seq += 1
        self._pending = set(range(len(self.runner.specs)))
        self.runner.request_expert_load(self._seq)

    def _take_local(self, wait: bool) -> None:
        """The in-process counters asked for, into the window of the step that asked, once they have
        landed (``wait``: now)."""
        if self._local is None or not (wait or self._local[0].ready()):
            return
        copy, layer_ids, step = self._local
        self._local = None
        logical, physical = copy.wait()
        self.aggregator.update(0, layer_ids, logical, physical)
        self.aggregator.close_window(step)

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
            self.aggregator.close_window(self.step)
