"""Serving benchmarks against a real ``moeserve serve`` subprocess (the embedded model, CPU).

load:   N concurrent streaming clients for T seconds over the ZeroMQ RPC and over HTTP (SSE). Every stream
        must complete without error and, under greedy decoding, equal the same prompt run alone (measured
        on the same server before the load). Reports p50 / p99 TTFT and inter-token latency.
prefix: a shared-prefix workload (G groups of requests whose prompts share a long head) against
        --replicas 2, once per routing policy: prefix-cache hit rate, TTFT and throughput.

    python benchmarks/bench_serve.py load --clients 200 --seconds 60
    python benchmarks/bench_serve.py prefix --groups 7 --requests 112 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from moeserve.client import AsyncClient
from moeserve.frontend.testing import serve_subprocess
from moeserve.launch.cmd_bench import percentile

PROMPTS = ["def fib(n):", "import os\n", "class Stack:", "for i in range(10):", "def parse(args):",
           "    return", "if __name__ == '__main__':", "with open(path) as f:", "try:\n", "@property\ndef",
           "from typing import", "async def main():", "raise ValueError(", "x = [", "def __init__(self", "# "]


def serve(*args: str) -> tuple[subprocess.Popen, str, str]:
    return serve_subprocess(*args)


class Stats:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.done = self.errors = self.mismatches = self.tokens = 0

    def summary(self, seconds: float) -> dict:
        ms = 1000.0
        return {"completed": self.done, "errors": self.errors, "mismatches": self.mismatches,
                "tokens": self.tokens, "tok_per_s": round(self.tokens / seconds, 1),
                "ttft_ms_p50": round(percentile(self.ttft, 50) * ms, 1), "ttft_ms_p99": round(percentile(self.ttft, 99) * ms, 1),
                "itl_ms_p50": round(percentile(self.itl, 50) * ms, 2), "itl_ms_p99": round(percentile(self.itl, 99) * ms, 2)}


async def rpc_stream(client: AsyncClient, prompt: str, max_tokens: int, stats: Stats) -> str:
    t0 = last = time.perf_counter()
    text = []
    async for f in client.generate(prompt, max_tokens=max_tokens, temperature=0):
        now = time.perf_counter()
        if f["type"] == "token":
            (stats.ttft if not text else stats.itl).append(now - (t0 if not text else last))
            text.append(f["text_delta"])
            stats.tokens += len(f["token_ids"])
            last = now
    return "".join(text)


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client for SSE: httpx's per-stream overhead, on the same 2 cores as the
    server, would otherwise be much of what the load test measures."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_sse(self, path: str, body: dict):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n")[0].decode())
        while True:  # chunked transfer encoding: one SSE event per chunk
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            for event in chunk[:-2].split(b"\n\n"):
                if event.startswith(b"data: ") and event != b"data: [DONE]":
                    yield json.loads(event[6:])

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def http_stream(client: RawHttp, prompt: str, max_tokens: int, stats: Stats) -> str:
    body = {"model": "moeserve-default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    t0 = last = time.perf_counter()
    text: list[str] = []
    async for event in client.post_sse("/v1/completions", body):
        now = time.perf_counter()
        (stats.ttft if not text else stats.itl).append(now - (t0 if not text else last))
        text.append(event["choices"][0]["text"])
        stats.tokens += 1
        last = now
    return "".join(text)


async def load(url: str, rpc: str, protocol: str, clients: int, seconds: float, max_tokens: int) -> dict:
    async with AsyncClient(rpc) as c:  # each prompt alone first: the reference
        alone = {p: (await c.complete(p, max_tokens=max_tokens, temperature=0)).text for p in PROMPTS}
    stats = Stats()
    deadline = time.perf_counter() + seconds

    async def one_client(i: int) -> None:
        rc = AsyncClient(rpc) if protocol == "rpc" else None
        http = RawHttp(url)
        k = i
        while time.perf_counter() < deadline:
            prompt = PROMPTS[k % len(PROMPTS)]
            k += 7
            try:
                if rc is not None:
                    text = await rpc_stream(rc, prompt, max_tokens, stats)
                else:
                    text = await http_stream(http, prompt, max_tokens, stats)
            except Exception as e:  # noqa: BLE001 - counted, and the run goes on
                stats.errors += 1
                print(f"client {i}: {type(e).__name__}: {e}", file=sys.stderr)
                await http.close()
                continue
            stats.done += 1
            stats.mismatches += text != alone[prompt]
        if rc is not None:
            await rc.close()
        await http.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return {"protocol": protocol, "clients": clients, "max_tokens": max_tokens,
            **stats.summary(time.perf_counter() - t0), "wall_s": round(time.perf_counter() - t0, 1)}


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


async def prefix_run(url: str, rpc: str, groups: int, requests: int, concurrency: int, head_tokens: int) -> dict:
    heads = [" ".join(f"g{g}w{i}" for i in range(head_tokens // 3)) for g in range(groups)]
    prompts = [heads[i % groups] + f"\n# request {i}\n" for i in range(requests)]
    stats, sem = Stats(), asyncio.Semaphore(concurrency)
    async with AsyncClient(rpc) as c:
        async def one(p: str) -> None:
            async with sem:
                await rpc_stream(c, p, 16, stats)
                stats.done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    hits, queries = metric(url, "moeserve_prefix_cache_hit_tokens_total"), \
        metric(url, "moeserve_prefix_cache_query_tokens_total")
    return {**stats.summary(wall), "prefix_hit_rate": round(hits / max(queries, 1), 3), "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("load", "prefix"))
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--protocols", default="rpc,http")
    ap.add_argument("--groups", type=int, default=7, help="odd, so that round robin does not align with groups")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--head-tokens", type=int, default=300)
    ap.add_argument("--kv-cache-memory", type=int, default=5 << 20, help="per replica (prefix mode)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    results = []
    if args.mode == "load":
        proc, url, rpc = serve("--max-num-seqs", "256")
        try:
            for protocol in args.protocols.split(","):
                results.append(asyncio.run(load(url, rpc, protocol, args.clients, args.seconds, args.max_tokens)))
                print(json.dumps(results[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    else:
        for routing in ("affinity", "round_robin"):
            proc, url, rpc = serve("--replicas", "2", "--routing", routing, "--replica-threads", "1",
                                   "--kv-cache-memory", str(args.kv_cache_memory))
            try:
                r = asyncio.run(prefix_run(url, rpc, args.groups, args.requests, args.concurrency, args.head_tokens))
                results.append({"routing": routing, **r})
                print(json.dumps(results[-1]), flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
