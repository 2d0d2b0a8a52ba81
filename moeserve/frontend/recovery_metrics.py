"""/metrics families of self-healing (coordinator/supervisor.py), read from each replica's ``EngineSnapshot``:
rank restarts by rank and node, the seconds restarts took, and the requests that went on after them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moeserve.coordinator.engine_driver import EngineSnapshot


def recovery_families(snaps: Sequence[EngineSnapshot]) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    restarts = CounterMetricFamily("moeserve_rank_restarts", "restarts of a replica's ranks after this rank failed",
                                   labels=["replica", "rank", "node"])
    recovering = GaugeMetricFamily("moeserve_recovering", "1 while the replica's ranks are being restarted",
                                   labels=["replica"])
    last = GaugeMetricFamily("moeserve_last_recovery_seconds", "seconds the latest restart of the ranks took (rank "
                             "failure seen -> new ranks loaded and serving)", labels=["replica"])
    total = CounterMetricFamily("moeserve_recovery_seconds", "seconds spent restarting ranks, over all restarts",
                                labels=["replica"])
    resumed = CounterMetricFamily("moeserve_resumed_requests", "streams mid-decode that went on after a restart",
                                  labels=["replica"])
    requeued = CounterMetricFamily("moeserve_requeued_requests", "queued or prefilling requests queued again "
                                   "after a restart", labels=["replica"])
    for i, s in enumerate(snaps):
        replica = str(i)
        for where, count in sorted(s.rank_restarts.items()):
            rank, _, node = where.partition("/")
            restarts.add_metric([replica, rank, node], count)
        recovering.add_metric([replica], float(s.recovering))
        last.add_metric([replica], s.last_recovery_s)
        total.add_metric([replica], s.recovery_s_total)
        resumed.add_metric([replica], s.num_resumed_requests)
        requeued.add_metric([replica], s.num_requeued_requests)
    yield from (restarts, recovering, last, total, resumed, requeued)
