"""``moeserve serve`` as a real subprocess: both protocols on the embedded model, SIGTERM drains (a request
in flight completes, new ones get 503) and the process exits cleanly; --replicas 2 routes by prefix; an
engine loop that raises (the test fault injection) fails its requests with engine_error, turns /health to 503
and ends the process with one error line, with one engine or replica processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from moeserve.client import Client, RpcError
from moeserve.coordinator.engine_driver import FAULT_ENV
from moeserve.frontend.testing import serve_subprocess


def start(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, str]:
    return serve_subprocess("--kv-cache-memory", str(32 << 20), *args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_serve_both_protocols_and_drain_on_sigterm() -> None:
    proc, url, rpc = start()
    try:
        body = {"model": "moeserve-default", "prompt": "def fib(n):", "max_tokens": 8, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        sse_text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
        for mode in ([], ["--raw", "--rpc", rpc]):  # moeserve chat streams a reply per input line
            chat = subprocess.run([sys.executable, "-m", "moeserve.launch.cli", "chat", "--url", url, *mode,
                                   "--max-tokens", "8", "--temperature", "0"], input="def fib(n):\n",
                                  capture_output=True, text=True, timeout=60)
            assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
        assert chat.stdout == sse_text + "\n"
        with Client(rpc, timeout_s=30) as c:
            assert c.complete("def fib(n):", max_tokens=8, temperature=0).text == sse_text
            frames = c.generate("def fib(n):", max_tokens=120, temperature=0, ignore_eos=True)
            next(frames)
            os.kill(proc.pid, signal.SIGTERM)  # drain: the request in flight still completes
            time.sleep(0.3)
            assert httpx.get(url + "/health", timeout=5).status_code == 503
            final = list(frames)[-1]
        assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 120
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read()  # the ready line is an ordinary message with the addresses, not a warning
        assert f"INFO moeserve.frontend.server: moeserve ready: OpenAI API {url}/v1, token RPC {rpc}" in err, err
        assert "WARNING" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_two_replicas_route_shared_prefixes_and_match_one_engine() -> None:
    from moeserve.client import AsyncClient, run
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine
    from moeserve.coordinator.sampling import SamplingParams
    from moeserve.frontend.server_config import ServerConfig
    from moeserve.frontend.testing import BackgroundServer

    engine_cfg = EngineConfig(kv_cache_memory=8 << 20)
    heads = ["import os\nimport sys\nimport json\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n",
             "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"]
    prompts = [h + tail for tail in ("    a", "    b", "    c", "    d") for h in heads]
    ref = Engine(engine_cfg).generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    with BackgroundServer(ServerConfig(engine=engine_cfg, port=0, rpc_port=0, replicas=2, replica_threads=1)) as s:
        async def main() -> list[list[int]]:
            async with AsyncClient(s.rpc_address) as c:
                first = [await c.complete(p, max_tokens=12, temperature=0, ignore_eos=True) for p in prompts[:2]]
                rest = [c.complete(p, max_tokens=12, temperature=0, ignore_eos=True) for p in prompts[2:]]
                return [r.token_ids for r in first + list(await asyncio.gather(*rest))]

        got = run(main())
        snaps = s.server.service.snapshots()
    assert got == [r.output_token_ids for r in ref]
    assert sum(x.num_prefix_hit_tokens for x in snaps) >= 6 * 16  # the 6 later prompts hit their head
    assert all(x.num_prefix_hit_tokens > 0 for x in snaps)  # each head went to its own replica


LONG = {"model": "moeserve-default", "prompt": "def fib(n):", "max_tokens": 400, "temperature": 0,
        "ignore_eos": True}


def sse_until_done(lines) -> list[dict]:
    """The JSON chunks of a completion stream, up to its data: [DONE]."""
    chunks = []
    for line in lines:
        if line == "data: [DONE]":
            return chunks
        if line:
            chunks.append(json.loads(line.removeprefix("data: ")))
    raise AssertionError(f"the stream ended without [DONE] after {chunks[-1:]}")


def expect_failed_and_exit(proc: subprocess.Popen, url: str, fault_steps: int) -> str:
    """/health is 503 "failed" and a new request a 503 at once; then the process exits 1 with one error line
    naming the cause (no traceback, no dead thread). Returns that line."""
    health = httpx.get(url + "/health", timeout=5)
    assert (health.status_code, health.json()) == (503, {"status": "failed"})
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json=LONG, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
    assert "the engine failed" in r.json()["error"]["message"] and time.monotonic() - t0 < 5
    assert proc.wait(timeout=60) == 1
    err = proc.stderr.read()
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in err and "Exception in thread" not in err, err
    assert f"InjectedFault: test fault injection: {FAULT_ENV}={fault_steps}" in errors[0], err
    return errors[0]


def test_engine_loop_failure_fails_requests_health_503_and_exit() -> None:
    """TEST FAULT INJECTION: the engine step raises after 100 steps (time to start all three), while an SSE
    stream, a JSON request and an RPC stream run; each fails at once with engine_error, then
    expect_failed_and_exit."""
    proc, url, rpc = start(env={**os.environ, FAULT_ENV: "100"})
    try:
        streamed = {**LONG, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=streamed, timeout=60) as sse, \
                Client(rpc, timeout_s=60) as c, ThreadPoolExecutor(1) as pool:
            lines = sse.iter_lines()
            assert next(lines).startswith("data: ")  # a token: the request runs
            frames = c.generate("import os", max_tokens=400, temperature=0, ignore_eos=True)
            assert next(frames)["type"] == "token"
            whole = pool.submit(httpx.post, url + "/v1/completions", json=LONG, timeout=60)
            chunks = sse_until_done(lines)
            assert chunks[-1]["error"]["code"] == "engine_error", chunks[-1]
            line = expect_failed_and_exit(proc, url, 100)
            assert chunks[-1]["error"]["message"] in line
            with pytest.raises(RpcError) as e:
                list(frames)
            assert e.value.code == "engine_error" and e.value.message == chunks[-1]["error"]["message"]
            r = whole.result()
            assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error", r.text
    finally:
        if proc.poll() is None:
            proc.kill()


def test_replica_loop_failure_fails_requests_health_503_and_exit() -> None:
    """The same with --replicas 2: the replica process whose loop raised says so, and the front end fails its
    requests and stops."""
    proc, url, _ = start("--replicas", "2", "--replica-threads", "1", env={**os.environ, FAULT_ENV: "20"})
    try:
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as sse:
            chunks = sse_until_done(sse.iter_lines())
        assert "choices" in chunks[0] and chunks[-1]["error"]["code"] == "engine_error"  # ran, then failed
        assert "replica" in expect_failed_and_exit(proc, url, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
