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

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from moeserve.coordinator.expert_load import LoadView

REBALANCE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REBALANCE_RESULTS = ("applied", "skipped", "failed")


@dataclass(frozen=True)
class LoadMetricsConfig:
    top_k: int = 4  # hottest and coldest experts per layer exported
    all_experts: bool = False  # export every expert of every layer (layers x experts series)

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"expert metrics top_k must be >= 0, got {self.top_k}")


def chosen_experts(window: torch.Tensor, top_k: int) -> torch.Tensor:
    """window: [layers, experts] -> [layers, min(2 * top_k, experts)] the hottest and coldest experts of
    each layer (each once)."""
    num = window.shape[-1]
    if 2 * top_k >= num:
        return torch.arange(num).expand(window.shape[0], num)
    order = torch.argsort(window, dim=-1, descending=True, stable=True)
    return torch.cat([order[:, :top_k], order[:, -top_k:]], dim=-1)


class ExpertLoadCollector:
    """Reads the latest ``LoadView`` of the first replica at scrape time (views are immutable)."""

    def __init__(self, views: Callable[[], Sequence[LoadView | None]], top_k: int = 4, all_experts: bool = False):
        self._views = views
        self.config = LoadMetricsConfig(top_k, all_experts)

    def collect(self) -> Iterator[Metric]:
        views = [v for v in self._views() if v is not None]
        if not views:
            return
        view = views[0]
        yield from self._rank_series(view)
        yield self._expert_series(view)
        yield from self._rebalance_series(view)

    @staticmethod
    def _rank_series(view: LoadView) -> Iterator[Metric]:
        tokens = CounterMetricFamily("moeserve_expert_tokens", "routed (token, expert) pairs served per MoE "
                                     "layer and EP rank, since start", labels=["layer", "rank"])
        per_rank = view.rank_load("total").tolist()  # [layers, ep]
        for layer, ranks, loads in zip(view.layer_ids, view.rank_ids, per_rank):
            layer_label = str(layer)
            for rank, load in zip(ranks, loads):
                tokens.add_metric([layer_label, str(rank)], load)
        yield tokens
        balance = GaugeMetricFamily("moeserve_ep_balancedness", "mean / max EP rank load of the latest window "
                                    "(1 = even)", labels=["layer"])
        for layer, value in zip(view.layer_ids, view.balancedness().tolist()):
            balance.add_metric([str(layer)], value)
        yield balance

    def _expert_series(self, view: LoadView) -> Metric:
        family = CounterMetricFamily("moeserve_expert_tokens_by_expert", "routed pairs per logical expert since "
                                     "start: the hottest and coldest of each layer's latest window, or all",
                                     labels=["layer", "expert"])
        window = view.window.sum(1)
        total = view.total.sum(1).tolist()
        chosen = torch.arange(window.shape[-1]).expand_as(window) if self.config.all_experts \
            else chosen_experts(window, self.config.top_k)
        for row, (layer, experts) in enumerate(zip(view.layer_ids, chosen.tolist())):
            for e in experts:
                family.add_metric([str(layer), str(e)], total[row][e])
        return family

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
