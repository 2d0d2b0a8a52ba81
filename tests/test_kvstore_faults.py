"""The store's faults cost recomputation, never a request or a token: ``moeserve serve`` with a real
``redis-server`` that is made slow, then killed in the middle of a stream of requests, then restarted empty.
Every request succeeds with the same tokens, and /metrics shows the breaker open and close again."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from redis_server import RedisServer

from moeserve.client import Client
from moeserve.frontend.testing import serve_subprocess

NO_REDIS = RedisServer.unavailable()
pytestmark = pytest.mark.skipif(NO_REDIS is not None, reason=f"store tests need redis-server: {NO_REDIS}")
BLOCK_BYTES = 5 * 128 * 4 * 16  # the embedded model's latent block: 5 layers x 128 values, float32, 16 tokens
GEN = torch.Generator().manual_seed(2)
PROMPTS = [torch.randint(0, 1000, (40,), generator=GEN).tolist() for _ in range(3)]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


def test_store_slow_then_killed_then_restarted_costs_no_request(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path).start()
    log = (tmp_path / "serve.err").open("w")
    proc, url, rpc = serve_subprocess(
        "--kv-store", redis.url, "--kv-host-memory", "0", "--kv-cache-memory", str(4 * BLOCK_BYTES),
        "--kv-store-timeout", "0.5", "--kv-store-probe-interval", "1", "--no-kv-load-cost-rule",
        timeout_s=300, stderr=log)
    asked = 0
    try:
        with Client(rpc) as client:
            def ask() -> list[list[int]]:
                nonlocal asked
                asked += len(PROMPTS)
                return [client.complete(token_ids=p, max_tokens=6, temperature=0, ignore_eos=True,
                                        return_fields=["token_ids"]).token_ids for p in PROMPTS]

            def scrape() -> str:
                return httpx.get(url + "/metrics", timeout=30).text

            want = ask()  # computed and stored (the device cache holds one prompt at a time)
            assert ask() == want
            m = scrape()
            assert metric(m, "moeserve_kv_store_hit_tokens_total", replica="0", tier="store") > 0
            slow = subprocess.Popen(["redis-cli", "-p", str(redis.port), "debug", "sleep", "3"])
            time.sleep(0.3)
            assert ask() == want  # every call times out (0.5 s): recomputed
            slow.wait()
            m = scrape()
            assert metric(m, "moeserve_kv_store_breaker_opened_total", replica="0") == 1
            time.sleep(1.2)  # past the probe interval: the next call probes, and closes the breaker
            assert ask() == want
            assert metric(scrape(), "moeserve_kv_store_breaker_state", replica="0") == 0
            redis.kill()  # in the middle of the stream
            assert ask() == want and ask() == want
            m = scrape()
            assert metric(m, "moeserve_kv_store_breaker_opened_total", replica="0") == 2
            assert metric(m, "moeserve_kv_store_breaker_state", replica="0") == 1
            assert metric(m, "moeserve_kv_store_errors_total", replica="0") >= 3
            redis.start()  # empty: everything stored before is gone
            time.sleep(1.5)  # past the probe interval
            assert ask() == want and ask() == want
            m = scrape()
            assert metric(m, "moeserve_kv_store_breaker_state", replica="0") == 0
            assert metric(m, "moeserve_requests_total", outcome="ok", protocol="rpc") == asked
            assert int(redis.cli("dbsize")) > 0  # writing again
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        redis.kill()
        log.close()
    assert "KV store" in (tmp_path / "serve.err").read_text()  # the warning
