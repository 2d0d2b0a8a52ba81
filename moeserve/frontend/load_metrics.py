"""Prometheus series of expert load and of the rebalancer, bounded in number.

Per layer and EP rank: ``moeserve_expert_tokens_total{layer,rank}``; per layer:
``moeserve_ep_balancedness{layer}`` (mean / max rank load over the latest window); per expert only the
``top_k`` hottest and coldest of each layer over the latest window (``moeserve_expert_tokens_by_expert_total
{layer,expert}``), or every expert with ``all_experts``; and the rebalancer's
``moeserve_eplb_rebalances_total{result}``, ``moeserve_eplb_rebalance_seconds`` (a histogram) and
``moeserve_eplb_steps_since_rebalance`` (an alert on it catches a rebalancer that silently stopped).

At DeepSeek-V3's 58 MoE layers x 64 ranks that is 3,712 + 58 + 58 x 2 x top_k series.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from moeserve.coordinator.expert_load import LoadView, sum_views

REBALANCE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REBALANCE_RESULTS = ("applied", "skipped", "failed", "backed-off")


@dataclass(frozen=True)
class LoadMetricsConfig:
    top_k: int = 4  # hottest and coldest experts per layer exported
    all_experts: bool = False  # export every expert of every layer (layers x experts series)

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"expert metrics top_k must be >= 0, got {self.top_k}")


def chosen_experts(window: np.ndarray, top_k: int) -> np.ndarray:
    """window: [layers, experts] -> [layers, min(2 * top_k, experts)] the hottest and coldest experts of
    each layer (each once)."""
    num = window.shape[-1]
    if 2 * top_k >= num:
        return np.broadcast_to(np.arange(num), window.shape)
    order = np.argsort(-window, axis=-1, kind="stable")
    return np.concatenate([order[:, :top_k], order[:, -top_k:]], axis=-1)


class ExpertLoadCollector:
    """Reads the latest ``LoadView`` of every replica at scrape time (views are immutable): the families
    above are of their sum (``sum_views``: by layer and EP rank, rank r of every replica together); with
    several replicas ``moeserve_replica_expert_tokens_total{replica,layer,rank}`` and
    ``moeserve_replica_ep_balancedness{replica,layer}`` add each replica's own. The small families are a
    prometheus-client collector; ``text`` renders the large ones (appended to /metrics by
    ``ServerMetrics.render``)."""

    def __init__(self, views: Callable[[], Sequence[LoadView | None]], top_k: int = 4, all_experts: bool = False):
        self._views = views
        self.config = LoadMetricsConfig(top_k, all_experts)
        # NOTE: a view changes once a window; scrapes in between reuse what was built for it
        self._families: tuple[tuple[LoadView | None, ...], list[Metric]] = ((), [])
        self._text: tuple[tuple[LoadView | None, ...], bytes] = ((), b"")
        self._sum: tuple[tuple[LoadView | None, ...], LoadView | None] = ((), None)

    def _current(self) -> tuple[tuple[LoadView | None, ...], LoadView | None]:
        """(every replica's view, their sum); the sum is kept while no view changes."""
        views = tuple(self._views())
        if not _same(views, self._sum[0]):
            live = [v for v in views if v is not None]
            self._sum = (views, sum_views(live) if live else None)
        return self._sum

    def _view(self) -> LoadView | None:
        return self._current()[1]

    def collect(self) -> Iterator[Metric]:
        views, view = self._current()
        if view is None:
            return
        if not _same(self._families[0], views):
            families = [self._balance_series(view), *self._rebalance_series(view)]
            if len(views) > 1:
                families.append(self._replica_balance_series(views))
            self._families = (views, families)
        yield from self._families[1]

    @staticmethod
    def _replica_balance_series(views: Sequence[LoadView | None]) -> Metric:
        balance = GaugeMetricFamily("moeserve_replica_ep_balancedness", "mean / max EP rank load of the latest "
                                    "window, per replica", labels=["replica", "layer"])
        for i, view in enumerate(views):
            if view is not None:
                for layer, value in zip(view.layer_ids, view.balancedness().tolist()):
                    balance.add_metric([str(i), str(layer)], value)
        return balance

    @staticmethod
    def _balance_series(view: LoadView) -> Metric:
        balance = GaugeMetricFamily("moeserve_ep_balancedness", "mean / max EP rank load of the latest window "
                                    "(1 = even)", labels=["layer"])
        for layer, value in zip(view.layer_ids, view.balancedness().tolist()):
            balance.add_metric([str(layer)], value)
        return balance

    def text(self) -> bytes:
        """The two large counter families in the text exposition format, written directly: at V3's size
        (3,712 + 464 samples) prometheus-client's encoder alone takes about 0.1 s of a busy CPU."""
        views, view = self._current()
        if view is None:
            return b""
        if not _same(self._text[0], views):
            text = self._render(view)
            if len(views) > 1:
                text += self._render_replicas(views)
            self._text = (views, text)
        return self._text[1]

    @staticmethod
    def _render_replicas(views: Sequence[LoadView | None]) -> bytes:
        lines = ["# HELP moeserve_replica_expert_tokens_total routed (token, expert) pairs served per replica, "
                 "MoE layer and EP rank, since start", "# TYPE moeserve_replica_expert_tokens_total counter"]
        for i, view in enumerate(views):
            if view is None:
                continue
            for layer, ranks, loads in zip(view.layer_ids, view.rank_ids, view.rank_load("total").tolist()):
                lines += [f'moeserve_replica_expert_tokens_total{{replica="{i}",layer="{layer}",rank="{rank}"}} '
                          f'{float(load)!r}' for rank, load in zip(ranks, loads)]
        return ("\n".join(lines) + "\n").encode()

    def _render(self, view: LoadView) -> bytes:
        lines = ["# HELP moeserve_expert_tokens_total routed (token, expert) pairs served per MoE layer and EP "
                 "rank, since start", "# TYPE moeserve_expert_tokens_total counter"]
        for layer, ranks, loads in zip(view.layer_ids, view.rank_ids, view.rank_load("total").tolist()):
            lines += [f'moeserve_expert_tokens_total{{layer="{layer}",rank="{rank}"}} {float(load)!r}'
                      for rank, load in zip(ranks, loads)]
        lines += ["# HELP moeserve_expert_tokens_by_expert_total routed pairs per logical expert since start: the "
                  "hottest and coldest of each layer's latest window, or all",
                  "# TYPE moeserve_expert_tokens_by_expert_total counter"]
        window, total = view.window.numpy().sum(1), view.total.numpy().sum(1)
        chosen = np.broadcast_to(np.arange(window.shape[-1]), window.shape) if self.config.all_experts \
            else chosen_experts(window, self.config.top_k)
        picked = np.take_along_axis(total, chosen, 1).tolist()
        for layer, experts, values in zip(view.layer_ids, chosen.tolist(), picked):
            lines += [f'moeserve_expert_tokens_by_expert_total{{layer="{layer}",expert="{e}"}} {float(v)!r}'
                      for e, v in zip(experts, values)]
        return ("\n".join(lines) + "\n").encode()

    @staticmethod
    def _rebalance_series(view: LoadView) -> Iterator[Metric]:
        results = CounterMetricFamily("moeserve_eplb_rebalances", "expert rebalances by result", labels=["result"])
        for result in REBALANCE_RESULTS:
            results.add_metric([result], sum(1 for r in view.rebalances if r.result == result))
        yield results
        seconds = sorted(r.seconds for r in view.rebalances if r.result == "applied")
        buckets = [(str(b), bisect.bisect_right(seconds, b)) for b in REBALANCE_BUCKETS] + [("+Inf", len(seconds))]
        yield HistogramMetricFamily("moeserve_eplb_rebalance_seconds", "from a rebalance's start to its new "
                                    "routing map serving", buckets=buckets, sum_value=sum(seconds))
        steps = GaugeMetricFamily("moeserve_eplb_steps_since_rebalance", "engine steps since the latest applied "
                                  "rebalance (or since start)")
        steps.add_metric([], view.steps_since_rebalance)
        yield steps
        if view.eplb_interval_steps:
            interval = GaugeMetricFamily("moeserve_eplb_interval_steps", "online rebalancing considers a new "
                                         "placement every this many steps")
            interval.add_metric([], view.eplb_interval_steps)
            yield interval


def _same(a: Sequence[LoadView | None], b: Sequence[LoadView | None]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
