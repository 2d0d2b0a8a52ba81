"""The coordinator's view of expert load: every rank's counters summed into windows.

Every ``interval`` steps the engine asks each rank for its cumulative counters (``ExpertLoadRequestMsg``;
in one process it reads the runner's counter). Replies arrive while the coordinator waits for later steps'
logits, so gathering never holds a step up. When every rank has answered a request, the window closes:
``LoadAggregator.close_window`` sums the ranks, takes the difference from the previous window, and publishes
an immutable ``LoadView`` that /metrics, /v1/expert_load, the dashboard and the EPLB planner read from any
thread (one reference swap).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from moeserve.experts.eplb import balancedness

HISTORY = 600  # windows of balancedness kept for the dashboard


@dataclass(frozen=True)
class Rebalance:
    time: float
    step: int
    result: str  # "applied" | "skipped" | "failed"
    seconds: float
    balancedness_before: float
    balancedness_after: float


@dataclass(frozen=True)
class LoadView:
    """Expert load of one replica after a window. Counts are routed (token, expert) pairs.

    ``total`` / ``window``: [layers, 2 (prefill, decode), num_logical]; ``physical_total`` / ``physical_window``:
    [layers, 2, num_physical] with physical slot ``ep_rank * slots_per_rank + slot``; ``phy2log``: [ep, slots]
    the current placement (None: one slot per logical expert on every rank); ``rank_ids``: [layers][ep] the
    global rank holding each EP rank's slots of each layer."""

    step: int
    time: float
    layer_ids: tuple[int, ...]
    total: torch.Tensor
    window: torch.Tensor
    physical_total: torch.Tensor
    physical_window: torch.Tensor
    phy2log: torch.Tensor | None
    rank_ids: tuple[tuple[int, ...], ...]
    window_s: float = 0.0
    history: tuple[tuple[float, int, float], ...] = ()  # (time, step, balancedness of the window)
    rebalances: tuple[Rebalance, ...] = ()
    steps_since_rebalance: int = 0
    eplb_interval_steps: int = 0  # online rebalancing's interval (0: off)
    rank_base: torch.Tensor | None = None  # [layers, ep] what each rank served under earlier placements


    @property
    def num_ranks(self) -> int:
        return 1 if self.phy2log is None else int(self.phy2log.shape[0])

    def rank_load(self, which: str = "window") -> torch.Tensor:
        """[layers, ep] pairs each EP rank served (prefill + decode) in the latest window, since start
        ("total"), or since the current placement began ("placement")."""
        # NOTE: numpy: these small reductions run on the HTTP thread, where torch's thread pool costs more
        # than the work when the cores are busy serving
        phys = (self.physical_window if which == "window" else self.physical_total).numpy()
        load = phys.reshape(phys.shape[0], 2, self.num_ranks, -1).sum(axis=(1, 3))
        if which == "total" and self.rank_base is not None:  # since start: earlier placements too
            load = load + self.rank_base.numpy()
        return torch.from_numpy(load)

    def balancedness(self, which: str = "window") -> torch.Tensor:
        """[layers] mean / max rank load (1.0 = perfectly even; a layer with no tokens counts as 1.0)."""
        return balancedness(self.rank_load(which))



@dataclass
class LoadAggregator:
    """Sums per-rank cumulative counters into windows (not thread-safe: the engine thread owns it)."""

    layer_ids: tuple[int, ...]
    num_logical: int
    phy2log: torch.Tensor | None = None
    _per_rank: dict[int, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    rebalances: list[Rebalance] = field(default_factory=list)
    view: LoadView | None = None
    _last_close: float = field(default_factory=time.monotonic)
    _last_rebalance_step: int = 0
    eplb_interval_steps: int = 0
    _rank_base: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.view = self._empty_view()

    @property
    def num_physical(self) -> int:
        return self.num_logical if self.phy2log is None else self.phy2log.numel()

    def _empty_view(self) -> LoadView:
        logical = torch.zeros(len(self.layer_ids), 2, self.num_logical, dtype=torch.long)
        physical = torch.zeros(len(self.layer_ids), 2, self.num_physical, dtype=torch.long)
        ranks = 1 if self.phy2log is None else self.phy2log.shape[0]
        return LoadView(0, time.time(), self.layer_ids, logical, logical.clone(), physical, physical.clone(),
                        self.phy2log, tuple(tuple(range(ranks)) for _ in self.layer_ids))

    def update(self, rank: int, layer_ids: list[int] | tuple[int, ...], logical: torch.Tensor,
               physical: torch.Tensor) -> None:
        """One rank's cumulative counters of its layers ([l, 2, E], [l, 2, P])."""
        self._per_rank[rank] = (tuple(layer_ids), logical, physical)

    def close_window(self, step: int) -> LoadView:
        """Sum the ranks' latest counters; the window is the difference from the previous view."""
        index = {layer_id: i for i, layer_id in enumerate(self.layer_ids)}
        logical = torch.zeros(len(self.layer_ids), 2, self.num_logical, dtype=torch.long)
        physical = torch.zeros(len(self.layer_ids), 2, self.num_physical, dtype=torch.long)
        first_rank: dict[int, int] = {}
        for rank, (layers, log, phys) in sorted(self._per_rank.items()):
            rows = torch.tensor([index[i] for i in layers], dtype=torch.long)
            if len(layers) and phys.shape[-1] == self.num_physical:
                logical.index_add_(0, rows, log)
                physical.index_add_(0, rows, phys)
            for i in layers:
                first_rank.setdefault(i, rank)
        prev = self.view
        assert prev is not None
        now = time.monotonic()
        ranks = 1 if self.phy2log is None else int(self.phy2log.shape[0])
        rank_ids = tuple(tuple(first_rank.get(i, 0) + r for r in range(ranks)) for i in self.layer_ids)
        view = LoadView(step, time.time(), self.layer_ids, logical, logical - prev.total, physical,
                        (physical - prev.physical_total).clamp(min=0), self.phy2log, rank_ids,
                        now - self._last_close, (), tuple(self.rebalances), step - self._last_rebalance_step,
                        self.eplb_interval_steps, self._rank_base)
        self._history.append((view.time, step, float(view.balancedness().mean()) if len(self.layer_ids) else 1.0))
        self.view = LoadView(**{**view.__dict__, "history": tuple(self._history)})
        self._last_close = now
        return self.view

    def set_placement(self, phy2log: torch.Tensor | None, rebalance: Rebalance) -> None:
        """A new placement is live: physical counters restart on every rank (and here)."""
        self.phy2log = phy2log
        self.rebalances.append(rebalance)
        self._last_rebalance_step = rebalance.step
        self._per_rank.clear()
        prev = self.view
        if prev is not None:
            self._rank_base = prev.rank_load("total")
        self.view = self._empty_view()
        if prev is not None:  # logical totals carry on: only the physical slots changed meaning
            self.view = LoadView(**{**self.view.__dict__, "total": prev.total, "window": prev.window,
                                    "history": prev.history, "rebalances": tuple(self.rebalances),
                                    "step": rebalance.step, "rank_base": self._rank_base,
                                    "eplb_interval_steps": self.eplb_interval_steps})
