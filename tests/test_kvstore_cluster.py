"""Two hosts share prefixes through a store on a third: ``moeserve serve`` on host A and on host B (network
namespaces with their own addresses, as in test_cluster.py) and ``redis-server`` on host C. A long prompt
served by A, then by B: B loads every full block from the store, and its greedy tokens equal A's and those
of one process with no store. Runs as root in CI; skips, saying why, where namespaces or redis-server are
missing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import NetnsHosts
from redis_server import RedisServer
from test_kvstore_faults import metric

REASON = NetnsHosts.unavailable() or RedisServer.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the two-host store test needs: {REASON}")
MOESERVE = [sys.executable, "-m", "moeserve.launch.cli"]
PROMPT = "def total(items):\n" + "".join(f"    step_{i} = items[{i}] * {i} + len(items)\n" for i in range(24))
BS = 16


def no_store_run() -> subprocess.Popen:
    """One process, no store, no host tier (started first: it runs while the hosts load)."""
    return subprocess.Popen([*MOESERVE, "generate", "--kv-host-memory", "0", "--temperature", "0", "--ignore-eos",
                             "--max-tokens", "8", "--json", PROMPT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_host_b_serves_host_a_prefix_from_a_store_on_host_c(tmp_path: Path) -> None:
    reference = no_store_run()
    with NetnsHosts(3) as hosts:
        redis = RedisServer(tmp_path, port=6390, bind=hosts.addrs[2],
                            prefix=["ip", "netns", "exec", hosts.names[2]]).start()
        serve = [*MOESERVE, "serve", "--port", "8090", "--rpc-port", "8091", "--kv-store", redis.url,
                 "--no-kv-load-cost-rule"]
        procs = [hosts.popen(i, serve, tmp_path / f"host{i}") for i in range(2)]
        for i in range(2):
            hosts.wait_healthy(i, 8090, 240)
        body = {"model": "moeserve-default", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}
        status, text_a = hosts.http(0, 8090, "/v1/completions", body)
        assert status == 200, text_a
        num_prompt = json.loads(text_a)["usage"]["prompt_tokens"]
        full = (num_prompt - 1) // BS  # full blocks before the last token
        assert full >= 8
        deadline = time.monotonic() + 60
        while int(redis.cli("dbsize")) < full and time.monotonic() < deadline:  # A writes in the background
            time.sleep(0.2)
        status, text_b = hosts.http(1, 8090, "/v1/completions", body)
        assert status == 200, text_b
        metrics_b = hosts.http(1, 8090, "/metrics")[1]
        metrics_a = hosts.http(0, 8090, "/metrics")[1]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
        redis.kill()
    assert metric(metrics_b, "moeserve_kv_store_hit_tokens_total", replica="0", tier="store") == full * BS
    assert metric(metrics_a, "moeserve_kv_store_hit_tokens_total", replica="0", tier="store") == 0
    assert metric(metrics_a, "moeserve_kv_store_written_bytes_total", replica="0", tier="store") > 0
    text_a, text_b = (json.loads(t)["choices"][0]["text"] for t in (text_a, text_b))
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    assert text_a == text_b == json.loads(out)["text"]
