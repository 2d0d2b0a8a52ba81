"""Prometheus families of the host tier and the shared store, from each replica's ``EngineSnapshot``
(``kv_tiers`` holds ``TierManager.snapshot()``). Read by frontend/metrics.py at scrape time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from moeserve.kvstore.remote import TRANSFER_BUCKETS
from moeserve.kvstore.tiers import LOAD_BUCKETS

_COUNTERS = {  # name: (help, snapshot key)
    "moeserve_kv_store_writes_dropped": ("blocks not written to the store because its queue was full",
                                         "writes_dropped"),
    "moeserve_kv_store_errors": ("store calls that failed or timed out", "store_errors"),
    "moeserve_kv_store_corrupt_blocks": ("stored blocks whose header or checksum did not match (misses)",
                                         "corrupt_blocks"),
    "moeserve_kv_store_loads_skipped": ("store loads skipped as slower than recomputing (cost rule)",
                                        "loads_skipped"),
    "moeserve_kv_store_breaker_opened": ("times the store's circuit breaker opened", "breaker_opened"),
}
_GAUGES = {
    "moeserve_kv_store_breaker_state": ("the store's circuit breaker: 0 closed, 1 open, 2 half open",
                                        "breaker_state"),
    "moeserve_kv_host_blocks_used": ("host-tier slots holding a block", "host_blocks_used"),
    "moeserve_kv_host_blocks_total": ("host-tier slots", "host_blocks_total"),
}


def tier_families(snaps: Sequence[Any]) -> Iterator[Any]:
    """Metric families for every replica that has tiers."""
    rows = [(str(i), s) for i, s in enumerate(snaps)]
    hits = CounterMetricFamily("moeserve_kv_store_hit_tokens", "prompt tokens found, by tier (device cache, "
                               "host memory, shared store)", labels=["replica", "tier"])
    queries = CounterMetricFamily("moeserve_kv_store_query_tokens", "prompt tokens looked up", labels=["replica"])
    read = CounterMetricFamily("moeserve_kv_store_read_bytes", "bytes loaded into the device cache, by tier",
                               labels=["replica", "tier"])
    written = CounterMetricFamily("moeserve_kv_store_written_bytes", "bytes written, by tier",
                                  labels=["replica", "tier"])
    for i, s in rows:
        t = s.kv_tiers or {}
        queries.add_metric([i], s.num_prefix_query_tokens)
        hits.add_metric([i, "device"], s.num_prefix_hit_tokens)
        for tier in ("host", "store"):
            hits.add_metric([i, tier], t.get(f"{tier}_hit_tokens", 0))
            read.add_metric([i, tier], t.get(f"{tier}_bytes_read", 0))
            written.add_metric([i, tier], t.get(f"{tier}_bytes_written", 0))
    yield from (hits, queries, read, written)
    for name, (doc, key) in _COUNTERS.items():
        c = CounterMetricFamily(name, doc, labels=["replica"])
        for i, s in rows:
            c.add_metric([i], (s.kv_tiers or {}).get(key, 0))
        yield c
    for name, (doc, key) in _GAUGES.items():
        g = GaugeMetricFamily(name, doc, labels=["replica"])
        for i, s in rows:
            g.add_metric([i], (s.kv_tiers or {}).get(key, 0))
        yield g
    yield _load_histogram(rows)
    yield from transfer_families(rows)


def transfer_families(rows: list[tuple[str, Any]]) -> Iterator[Any]:
    """Prefill/decode transfers (kvstore/remote.py ``TransferStats``), per replica and role: a prefill
    instance counts what it served, a decode instance what it pulled."""
    rows = [(i, s.kv_tiers) for i, s in rows if (s.kv_tiers or {}).get("transfer_role")]
    if not rows:
        return
    labels = ["replica", "role"]
    nbytes = CounterMetricFamily("moeserve_kv_transfer_bytes", "latent bytes moved between instances", labels=labels)
    count = CounterMetricFamily("moeserve_kv_transfers", "KV transfers between instances", labels=labels)
    failed = CounterMetricFamily("moeserve_kv_transfer_failures", "KV transfers refused, timed out or broken "
                                 "(the decode instance computed the prompt itself)", labels=labels)
    hist = HistogramMetricFamily("moeserve_kv_transfer_seconds", "time of one KV transfer", labels=labels)
    for i, t in rows:
        key = [i, t["transfer_role"]]
        nbytes.add_metric(key, t["transfer_bytes"])
        count.add_metric(key, t["transfers"])
        failed.add_metric(key, t["transfer_failures"])
        cumulative, buckets = 0, []
        for bound, n in zip([*map(str, TRANSFER_BUCKETS), "+Inf"], t["transfer_s_buckets"]):
            cumulative += n
            buckets.append((bound, cumulative))
        hist.add_metric(key, buckets, sum_value=t["transfer_s_sum"])
    yield from (nbytes, count, failed, hist)


def _load_histogram(rows: list[tuple[str, Any]]) -> HistogramMetricFamily:
    h = HistogramMetricFamily("moeserve_kv_store_load_seconds", "time to load a prefix from the host tier and "
                              "the store into the device cache (all ranks)", labels=["replica"])
    for i, s in rows:
        t = s.kv_tiers or {}
        counts = t.get("load_s_buckets") or [0] * (len(LOAD_BUCKETS) + 1)
        cumulative, buckets = 0, []
        for bound, n in zip([*map(str, LOAD_BUCKETS), "+Inf"], counts):
            cumulative += n
            buckets.append((bound, cumulative))
        h.add_metric([i], buckets, sum_value=t.get("load_s_sum", 0.0))
    return h
