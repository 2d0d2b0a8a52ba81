"""``moeserve serve`` as a real subprocess: both protocols on the embedded model, SIGTERM drains (a request
in flight completes, new ones get 503) and the process exits cleanly; --replicas 2 routes by prefix."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx

from moeserve.client import Client
from moeserve.frontend.testing import serve_subprocess


def start(*args: str) -> tuple[subprocess.Popen, str, str]:
    return serve_subprocess("--kv-cache-memory", str(32 << 20), *args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


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
    from moeserve.frontend.server import ServerConfig
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
