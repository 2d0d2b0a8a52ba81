"""``moeserve launch cluster`` starting a disaggregated deployment from one ``cluster.toml``: three hosts
(network namespaces with their own addresses) run the same command; the ``[disaggregation]`` table makes the
first a prefill instance, the second a decode instance and the third the router. Greedy tokens through the
router equal one process's; the decode instance pulled the prompts' blocks across hosts; the prefill node
killed costs no request; SIGTERM stops every node and the router with them.

These run as root in CI; where namespaces cannot be made they skip and say why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import NetnsHosts
from prometheus_client.parser import text_string_to_metric_families

from moeserve.launch.cluster_config import ClusterError
from moeserve.launch.cluster_roles import RolePlan, role_plan

REASON = NetnsHosts.unavailable()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"multi-node tests need network namespaces: {REASON}")

MOESERVE = [sys.executable, "-m", "moeserve.launch.cli"]
# long enough for several 16-token blocks each
PROMPTS = [" ".join(f"item{i}" for i in range(30)), "def f(x):\n    return x + 1\n" * 6,
           "class A:\n    pass\n" * 8]
MAX_TOKENS = 8
PORT, ROUTER_PORT, TRANSFER_PORT = 8101, 8100, 7101


def single_process(ckpt: Path) -> list[str]:
    proc = subprocess.run([*MOESERVE, "generate", "--model", str(ckpt), "--temperature", "0", "--ignore-eos",
                           "--json", "--max-tokens", str(MAX_TOKENS), *PROMPTS], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line)["text"] for line in proc.stdout.splitlines()]


def complete(hosts: NetnsHosts, model: str, prompt: str) -> str:
    """A greedy completion through the router, asked from the router's host."""
    status, text = hosts.http(2, ROUTER_PORT, "/v1/completions", {
        "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True},
        addr=hosts.addrs[2])
    assert status == 200, text
    return json.loads(text)["choices"][0]["text"]


def transfer_bytes(hosts: NetnsHosts) -> float:
    status, text = hosts.http(2, PORT, "/metrics", addr=hosts.addrs[1])
    assert status == 200, text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "moeserve_kv_transfer_bytes_total" and s.labels.get("role") == "decode")


def test_role_plan_from_the_table() -> None:
    hosts = ["h0", "h1", "h2"]
    plan = role_plan({"prefill": ["h0"], "decode": ["h1", "h2"], "port": 9001}, hosts)
    assert plan == RolePlan(("h0",), ("h1", "h2"), "h0", port=9001)
    assert [plan.mode_of(h) for h in hosts] == ["prefill", "decode", "decode"]
    assert plan.router_argv("0.0.0.0") == ["router", "--prefill", "http://h0:9001", "--decode", "http://h1:9001",
                                           "http://h2:9001", "--host", "0.0.0.0", "--port", "8000"]
    for table, message in (({"prefill": ["h0"], "decode": ["h0"]}, "given both roles"),
                           ({"prefill": ["h0"], "decode": ["h9"]}, r"host\(s\) \['h9'\] that are not in"),
                           ({"prefill": ["h0"]}, "at least one prefill and one decode"),
                           ({"prefill": ["h0"], "decode": ["h1"], "ports": 1}, "unknown .disaggregation. key"),
                           ({"prefill": ["h0"], "decode": ["h1"], "router_port": 8001}, "must differ")):
        with pytest.raises(ClusterError, match=message):
            role_plan(table, hosts)


@needs_netns
def test_roles_from_config_stream_the_tokens_of_one_process(ckpt_factory, tmp_path: Path) -> None:
    ckpt = ckpt_factory("v3_noshared")
    reference = single_process(ckpt)
    with NetnsHosts(3) as hosts:
        a = hosts.addrs
        config = tmp_path / "cluster.toml"
        config.write_text(f'[cluster]\nhosts = ["{a[0]}", "{a[1]}", "{a[2]}"]\n\n'
                          f'[engine]\nmodel = "{ckpt}"\nkv_cache_memory = {32 << 20}\nkv_host_memory = 0\n\n'
                          f'[disaggregation]\nprefill = ["{a[0]}"]\ndecode = ["{a[1]}"]\nrouter = "{a[2]}"\n'
                          f'port = {PORT}\nrouter_port = {ROUTER_PORT}\ntransfer_port = {TRANSFER_PORT}\n')
        cmd = [*MOESERVE, "launch", "cluster", "--config", str(config)]
        procs = [hosts.popen(i, cmd, tmp_path / f"node{i}") for i in range(3)]
        logs = lambda: [(tmp_path / f"node{i}.err").read_text() for i in range(3)]  # noqa: E731
        deadline = time.monotonic() + 240
        while hosts.http(2, ROUTER_PORT, "/health", addr=a[2])[0] != 200:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs()
            time.sleep(0.5)
        assert [complete(hosts, ckpt.name, p) for p in PROMPTS[:2]] == reference[:2]
        assert transfer_bytes(hosts) > 0, logs()  # the decode host pulled blocks from the prefill host
        err = logs()
        assert "prefill instance" in err[0] and "decode instance" in err[1] and "router on" in err[2], err

        for pid in hosts.pids(0):  # the prefill host dies: the decode instance computes prompts itself
            os.kill(pid, signal.SIGKILL)
        assert complete(hosts, ckpt.name, PROMPTS[2]) == reference[2]

        for proc in procs[1:]:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for proc in procs[1:]:
            assert proc.wait(max(1.0, deadline - time.monotonic())) == 0, logs()
        assert hosts.wait_empty(10)  # the router went with its node
