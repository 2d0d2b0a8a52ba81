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
    """One layer's rebalance (``layer`` -1: a check that moved no layer). ``balancedness_before``: measured
    since the layer's previous placement began; ``balancedness_after``: the planner's prediction, on the
    same counts; ``measured_after``: measured on the new placement, once it has served enough pairs (NaN
    until then). ``seconds``: from the first chunk sent to the last one applied; ``max_stall_s``: the
    longest any rank was held up by one chunk."""

    time: float
    step: int
    result: str  # "applied" | "skipped" | "failed" | "backed-off"
    seconds: float
    balancedness_before: float
    balancedness_after: float
    layer: int = -1
    moves: int = 0
    chunks: int = 0
    max_stall_s: float = 0.0
    measured_after: float = float("nan")
    over_bound: int = 0  # chunks that held a rank up longer than the stall bound


@dataclass(frozen=True)
class LoadView:
    """Expert load of one replica after a window. Counts are routed (token, expert) pairs.

    ``total`` / ``window``: [layers, 2 (prefill, decode), num_logical]; ``physical_total`` / ``physical_window``:
    [layers, 2, num_physical] with physical slot ``ep_rank * slots_per_rank + slot`` of the layer's own
    placement; ``phy2log``: [layers, ep, slots] each MoE layer's current placement (None: one slot per
    logical expert on every rank); ``rank_ids``: [layers][ep] the global rank holding each EP rank's slots of
    each layer. Physical counts of a layer restart when its placement changes ("placement" scope)."""

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
    num_ep_ranks: int = 1  # EP ranks when there is no one placement (replicas summed, each its own)


    @property
    def num_ranks(self) -> int:
        return self.num_ep_ranks if self.phy2log is None else int(self.phy2log.shape[1])

    def rank_load(self, which: str = "window") -> torch.Tensor:
        """[layers, ep] pairs each EP rank served (prefill + decode) in the latest window, since start
        ("total"), or since each layer's current placement began ("placement")."""
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
    """Sums per-rank cumulative counters into windows (not thread-safe: the engine thread owns it).
    ``phy2log``: [layers, ep, slots] (or [ep, slots]: every layer starts with it)."""

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
        if self.phy2log is not None and self.phy2log.dim() == 2:
            self.phy2log = self.phy2log.unsqueeze(0).repeat(len(self.layer_ids), 1, 1)
        self.view = self._empty_view()

    @property
    def num_physical(self) -> int:
        return self.num_logical if self.phy2log is None else int(self.phy2log[0].numel())

    @property
    def num_ranks(self) -> int:
        return 1 if self.phy2log is None else int(self.phy2log.shape[1])

    def _empty_view(self) -> LoadView:
        logical = torch.zeros(len(self.layer_ids), 2, self.num_logical, dtype=torch.long)
        physical = torch.zeros(len(self.layer_ids), 2, self.num_physical, dtype=torch.long)
        return LoadView(0, time.time(), self.layer_ids, logical, logical.clone(), physical, physical.clone(),
                        self.phy2log, tuple(tuple(range(self.num_ranks)) for _ in self.layer_ids))

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
        rank_ids = tuple(tuple(first_rank.get(i, 0) + r for r in range(self.num_ranks)) for i in self.layer_ids)
        view = LoadView(step, time.time(), self.layer_ids, logical, logical - prev.total, physical,
                        (physical - prev.physical_total).clamp(min=0), self.phy2log, rank_ids,
                        now - self._last_close, (), tuple(self.rebalances), step - self._last_rebalance_step,
                        self.eplb_interval_steps, self._rank_base)
        self._history.append((view.time, step, float(view.balancedness().mean()) if len(self.layer_ids) else 1.0))
        self.view = LoadView(**{**view.__dict__, "history": tuple(self._history)})
        self._last_close = now
        return self.view

    def set_layer_placement(self, layer_id: int, phy2log: torch.Tensor) -> None:
        """Layer ``layer_id`` serves with ``phy2log`` [ep, slots] from the next step: its physical counters
        restart on every rank (and here); what its ranks served before stays in the "total" scope."""
        assert self.phy2log is not None and self.view is not None
        i = self.layer_ids.index(layer_id)
        prev = self.view
        total_now = prev.rank_load("total")  # what each rank served so far, earlier placements included
        base = torch.zeros_like(total_now) if self._rank_base is None else self._rank_base.clone()
        base[i] = total_now[i]
        self._rank_base = base
        self.phy2log = self.phy2log.clone()
        self.phy2log[i] = phy2log
        for rank, (layers, log, phys) in list(self._per_rank.items()):
            if layer_id in layers:
                phys = phys.clone()
                phys[layers.index(layer_id)] = 0
                self._per_rank[rank] = (layers, log, phys)
        total, window = prev.physical_total.clone(), prev.physical_window.clone()
        total[i] = 0
        window[i] = 0
        self.view = LoadView(**{**prev.__dict__, "physical_total": total, "physical_window": window,
                                "phy2log": self.phy2log, "rank_base": self._rank_base})

    def record(self, rebalance: Rebalance) -> None:
        self.rebalances.append(rebalance)
        if rebalance.result == "applied":
            self._last_rebalance_step = rebalance.step
        if self.view is not None:
            self.view = LoadView(**{**self.view.__dict__, "rebalances": tuple(self.rebalances)})


def sum_views(views: list[LoadView]) -> LoadView:
    """Several replicas' views as one: expert counts added, and rank counts by EP rank (rank r of every
    replica together). Where the replicas' placements differ (each rebalances on its own) the sum has no one
    placement (``phy2log`` None): its physical counts are added slot by slot, which keeps each EP rank's
    total right but not which expert a slot holds."""
    if len(views) == 1:
        return views[0]
    first = views[0]
    if any(v.layer_ids != first.layer_ids or v.total.shape != first.total.shape
           or v.physical_total.shape != first.physical_total.shape for v in views):
        raise ValueError("replicas with different MoE layers, experts or slots cannot be summed")
    same = all(v.phy2log is not None and first.phy2log is not None and torch.equal(v.phy2log, first.phy2log)
               for v in views)

    def add(name: str) -> torch.Tensor:
        return sum((getattr(v, name) for v in views), torch.zeros_like(getattr(first, name)))

    bases = [v.rank_base for v in views if v.rank_base is not None]
    history = tuple(sorted((h for v in views for h in v.history), key=lambda h: h[0]))
    return LoadView(max(v.step for v in views), max(v.time for v in views), first.layer_ids, add("total"),
                    add("window"), add("physical_total"), add("physical_window"), first.phy2log if same else None,
                    first.rank_ids, max(v.window_s for v in views), history,
                    tuple(sorted((r for v in views for r in v.rebalances), key=lambda r: r.time)),
                    min(v.steps_since_rebalance for v in views), first.eplb_interval_steps,
                    sum(bases, torch.zeros_like(bases[0])) if bases else None, first.num_ranks)
