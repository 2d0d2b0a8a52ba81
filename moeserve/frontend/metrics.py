"""Prometheus metrics of one server, in their own registry (no process-global state)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moeserve.coordinator.engine_driver import EngineSnapshot
from moeserve.frontend.recovery_metrics import recovery_families
from moeserve.kvstore.metrics import tier_families

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# fine from 5 to 50 ms, where decode steps fall: an instance's own ITL p50 and p99 can be read off them
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.25, 0.5, 1.0, 2.5, 5.0)
# finished: ok, aborted; refused for the client's mistake (4xx): bad_request, unauthorized, client_error;
# busy (429); failed on the server's side (5xx): unavailable, error (FrontendError.outcome)
OUTCOMES = ("ok", "aborted", "bad_request", "unauthorized", "client_error", "busy", "unavailable", "error")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector:
    """Reads each replica's latest ``EngineSnapshot`` at scrape time."""

    def __init__(self, snapshots: Callable[[], Sequence[EngineSnapshot]]):
        self._snapshots = snapshots

    def collect(self):
        snaps = list(self._snapshots())
        gauges = {
            "moeserve_requests_running": ("requests being computed", lambda s: s.num_running),
            "moeserve_requests_waiting": ("requests queued in the engines", lambda s: s.num_waiting),
            "moeserve_kv_blocks_used": ("latent-cache blocks in use", lambda s: s.num_kv_blocks_used),
            "moeserve_kv_blocks_total": ("latent-cache blocks", lambda s: s.num_kv_blocks_total),
        }
        for name, (doc, get) in gauges.items():
            yield per_replica(GaugeMetricFamily, name, doc, snaps, get)
        hits = CounterMetricFamily("moeserve_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                   labels=["replica"])
        queries = CounterMetricFamily("moeserve_prefix_cache_query_tokens",
                                      "prompt tokens looked up in the prefix cache", labels=["replica"])
        for i, s in enumerate(snaps):
            hits.add_metric([str(i)], s.num_prefix_hit_tokens)
            queries.add_metric([str(i)], s.num_prefix_query_tokens)
        yield hits
        yield queries
        yield from _spec_families(snaps)
        yield from tier_families(snaps)  # host tier and shared store (kvstore/metrics.py)
        yield from recovery_families(snaps)  # rank restarts (recovery_metrics.py)


def per_replica(family, name: str, doc: str, snaps: Sequence[EngineSnapshot], get):
    """One metric family with a sample per replica (label ``replica``), each ``get(snapshot)``."""
    metric = family(name, doc, labels=["replica"])
    for i, s in enumerate(snaps):
        metric.add_metric([str(i)], get(s))
    return metric


def _spec_families(snaps: Sequence[EngineSnapshot]):
    """Speculative decoding (vLLM's names, under moeserve_): drafts verified and accepted, verifications, and
    the mean acceptance length (tokens a sequence gets per verify step: accepted drafts + 1)."""
    families = {
        "moeserve_spec_decode_draft_tokens": ("draft tokens verified", lambda s: s.num_spec_draft_tokens),
        "moeserve_spec_decode_accepted_tokens": ("draft tokens accepted", lambda s: s.num_spec_accepted_tokens),
        "moeserve_spec_decode_verifications": ("sequence steps that verified drafts", lambda s: s.num_spec_verifies),
    }
    for name, (doc, get) in families.items():
        yield per_replica(CounterMetricFamily, name, doc, snaps, get)
    g = GaugeMetricFamily("moeserve_spec_decode_mean_acceptance_length",
                          "tokens per sequence per verify step so far (0 before any)", labels=["replica"])
    for i, s in enumerate(snaps):
        n = s.num_spec_verifies
        g.add_metric([str(i)], (s.num_spec_accepted_tokens + n) / n if n else 0.0)
    yield g


class ServerMetrics:
    def __init__(self, snapshots: Callable[[], Sequence[EngineSnapshot]] = list):
        self.registry = CollectorRegistry()
        self.requests = Counter("moeserve_requests", "finished requests by outcome and protocol",
                                ["outcome", "protocol"], registry=self.registry)
        self.ttft = Histogram("moeserve_time_to_first_token_seconds", "arrival to first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("moeserve_inter_token_latency_seconds", "time between streamed tokens",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("moeserve_prompt_tokens", "prompt tokens of admitted requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("moeserve_generation_tokens", "generated tokens",
                                         registry=self.registry)
        self.registry.register(_EngineCollector(snapshots))  # type: ignore[arg-type]
        self.extra_text: list[Callable[[], bytes]] = []  # families rendered elsewhere (dashboard/routes.py)

    def outcome(self, outcome: str, protocol: str) -> None:
        self.requests.labels(outcome if outcome in OUTCOMES else "error", protocol).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry) + b"".join(render() for render in self.extra_text)
