"""Chaos run against a real ``moeserve serve`` (the embedded model by default; CPU gloo ranks): mixed load
while faults are injected at random, then what became of every request.

Load (``--clients`` workers over HTTP, each picking at random): greedy SSE streams, greedy JSON requests, long
prompts, slow readers (a pause between chunks), clients that disconnect mid-stream, and bad requests (each
must get a typed 4xx). Every greedy answer that completes is compared with the same prompt run alone on the
same server before the chaos starts (``mismatched``).

Faults (one every ``--fault-interval`` seconds on average, in turn): SIGKILL of a random stage worker; the
shared KV store (redis-server, if installed) SIGKILLed and started again a few seconds later; a rank again; a
forced expert rebalance (POST /admin/rebalance, where the layout has expert parallelism).

Reported: requests sent, completed (and of those mismatched), failed with a typed error, resumed (the server's
``moeserve_resumed_requests_total``), hung (no answer within ``--request-timeout``), HTTP 500s, disconnects
and bad requests refused, the faults injected, the restarts and their recovery seconds.

    python benchmarks/chaos.py --seconds 150                        # the short run of BENCHMARKS.md
    python benchmarks/chaos.py --seconds 600 --clients 8            # the 10-minute run of issue 24
    python benchmarks/chaos.py --layout "--pp 2" --no-kv-store     # another layout, no store
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from moeserve.frontend.testing import free_port, rank_pids, serve_subprocess

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisServer  # noqa: E402  (tests/redis_server.py: a real redis-server)

PROMPTS = ["def fib(n):", "import numpy as np", "class Stack:", "for i in range(10):", "def parse(args):",
           "with open(path) as f:", "async def main():", "from typing import"]
LONG_PROMPTS = ["# a long file\n" + f"def f{i}(x):\n    return x * {i}\n" * 28 for i in range(2)]
BAD_BODIES = [{"prompt": "x", "max_tokens": -3}, {"prompt": "x", "temperature": "hot"}, {"max_tokens": 4},
              {"prompt": "x", "max_tokens": 10 ** 9}, {"prompt": "x", "top_p": 7}]


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    mismatched: int = 0
    typed_failed: int = 0
    hung: int = 0
    http_500: int = 0
    disconnected: int = 0
    bad_refused: int = 0
    untyped: int = 0  # an answer that is neither a result nor a typed error (should stay 0)
    answered_twice: int = 0  # a stream that ended twice (two [DONE]s)
    faults: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # the first few typed failures, for the record

    def fault(self, name: str) -> None:
        self.faults[name] = self.faults.get(name, 0) + 1


class Chaos:
    def __init__(self, args: argparse.Namespace, proc: subprocess.Popen, url: str, store: RedisServer | None):
        self.args, self.proc, self.url, self.store = args, proc, url, store
        self.model = "moeserve-default"
        self.reference: dict[str, str] = {}
        self.tally = Tally()
        self.rng = random.Random(args.seed)

    def body(self, prompt: str, stream: bool) -> dict:
        return {"model": self.model, "prompt": prompt, "max_tokens": self.args.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": stream}

    async def solo(self, client: httpx.AsyncClient) -> None:
        """Each prompt alone, before any fault: the answers the chaos run must reproduce."""
        for prompt in PROMPTS + LONG_PROMPTS:
            r = await client.post(self.url + "/v1/completions", json=self.body(prompt, False), timeout=300)
            r.raise_for_status()
            self.reference[prompt] = r.json()["choices"][0]["text"]

    async def sse(self, client: httpx.AsyncClient, prompt: str, pause_s: float = 0.0,
                  disconnect_after: int | None = None) -> None:
        text, chunks, done = "", 0, 0
        async with client.stream("POST", self.url + "/v1/completions", json=self.body(prompt, True)) as r:
            if r.status_code != 200:
                return self.answer_error(r.status_code, (await r.aread()).decode())
            async for line in r.aiter_lines():
                done += line == "data: [DONE]"
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return self.failed(chunk["error"]["code"], chunk["error"]["message"])
                text += chunk["choices"][0]["text"]
                chunks += 1
                if disconnect_after is not None and chunks >= disconnect_after:
                    self.tally.disconnected += 1
                    return None
                if pause_s:
                    await asyncio.sleep(pause_s)
        self.tally.answered_twice += done > 1
        self.completed(prompt, text)

    async def whole(self, client: httpx.AsyncClient, prompt: str) -> None:
        r = await client.post(self.url + "/v1/completions", json=self.body(prompt, False))
        if r.status_code != 200:
            return self.answer_error(r.status_code, r.text)
        self.completed(prompt, r.json()["choices"][0]["text"])

    async def bad(self, client: httpx.AsyncClient) -> None:
        r = await client.post(self.url + "/v1/completions", json={"model": self.model,
                                                                   **self.rng.choice(BAD_BODIES)})
        if r.status_code == 500:
            self.tally.http_500 += 1
        elif 400 <= r.status_code < 500 and "error" in r.json():
            self.tally.bad_refused += 1
        elif r.status_code == 503:
            self.tally.typed_failed += 1
        else:
            self.tally.untyped += 1

    def completed(self, prompt: str, text: str) -> None:
        self.tally.completed += 1
        if text != self.reference[prompt]:
            self.tally.mismatched += 1

    def failed(self, code: str, message: str) -> None:
        self.tally.typed_failed += 1
        if len(self.tally.failures) < 5:
            self.tally.failures.append(f"{code}: {message[:160]}")

    def answer_error(self, status: int, text: str) -> None:
        if status == 500:
            self.tally.http_500 += 1
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            self.tally.untyped += 1
            return
        if status != 500:
            self.failed(error["code"], error["message"])

    async def one(self, client: httpx.AsyncClient) -> None:
        kind = self.rng.choices(["sse", "whole", "long", "slow", "disconnect", "bad"], [4, 2, 1, 1, 1, 1])[0]
        prompt = self.rng.choice(LONG_PROMPTS if kind == "long" else PROMPTS)
        self.tally.sent += 1
        work = {"sse": lambda: self.sse(client, prompt), "whole": lambda: self.whole(client, prompt),
                "long": lambda: self.sse(client, prompt), "slow": lambda: self.sse(client, prompt, pause_s=0.05),
                "disconnect": lambda: self.sse(client, prompt, disconnect_after=self.rng.randint(1, 8)),
                "bad": lambda: self.bad(client)}[kind]
        try:
            await asyncio.wait_for(work(), self.args.request_timeout)
        except TimeoutError:
            self.tally.hung += 1
        except httpx.HTTPError as e:  # the front end itself stopped answering
            self.tally.untyped += 1
            if len(self.tally.failures) < 5:
                self.tally.failures.append(f"transport: {type(e).__name__}: {e}")

    async def client_loop(self, client: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until and self.proc.poll() is None:
            await self.one(client)

    async def faults(self, until: float) -> None:
        """A fault every ``fault_interval`` s on average, in turn: a rank, the store, a rank, a rebalance."""
        kinds = ["kill_rank", "kv_store", "kill_rank", "rebalance"] if self.store is not None else \
            ["kill_rank", "kill_rank", "rebalance"]
        for turn in range(1 << 30):
            await asyncio.sleep(self.rng.expovariate(1 / self.args.fault_interval))
            if time.monotonic() >= until or self.proc.poll() is not None:
                return
            kind = kinds[turn % len(kinds)]
            if kind == "kill_rank":
                pids = rank_pids(self.proc.pid)
                if pids:
                    rank = self.rng.choice(sorted(pids))
                    os.kill(pids[rank], signal.SIGKILL)
                    self.tally.fault(f"kill_rank_{rank}")
            elif kind == "kv_store":
                assert self.store is not None
                self.store.kill()
                self.tally.fault("kv_store_kill")
                await asyncio.sleep(self.rng.uniform(1, 5))
                self.store.start()
            else:
                asked = time.time()
                async with httpx.AsyncClient(timeout=10) as c:
                    r = await c.post(self.url + "/admin/rebalance")
                    self.tally.fault("rebalance" if r.status_code == 202 else f"rebalance_{r.status_code}")
                    for _ in range(10):  # staged in the background, between steps: read back what it did
                        await asyncio.sleep(2)
                        done = [d for d in await rebalances(c, self.url) if d["time"] >= asked]
                        if done:
                            self.tally.fault(f"rebalance_{done[0]['result']}")
                            break

    async def run(self) -> dict:
        limits = httpx.Limits(max_connections=self.args.clients * 2)
        async with httpx.AsyncClient(timeout=self.args.request_timeout, limits=limits) as client:
            await self.solo(client)
            start = time.monotonic()
            until = start + self.args.seconds
            await asyncio.gather(self.faults(until), *(self.client_loop(client, until)
                                                       for _ in range(self.args.clients)))
            elapsed = time.monotonic() - start
            metrics = (await client.get(self.url + "/metrics")).text if self.proc.poll() is None else ""
        return {"seconds": round(elapsed, 1), **asdict(self.tally), **server_figures(metrics),
                "server_alive": self.proc.poll() is None}


async def rebalances(client: httpx.AsyncClient, url: str) -> list[dict]:
    """The replica's rebalances so far, from the dashboard's first event (since its ranks' latest start)."""
    try:
        async with client.stream("GET", url + "/dashboard/events") as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return json.loads(line[6:]).get("rebalances", [])
    except (httpx.HTTPError, ValueError):
        pass
    return []


def server_figures(metrics: str) -> dict:
    """What the server counted: resumed and re-queued requests, restarts, recovery seconds."""
    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", metrics, re.M))

    restarts = total("moeserve_rank_restarts_total")
    seconds = total("moeserve_recovery_seconds_total")
    return {"resumed": int(total("moeserve_resumed_requests_total")),
            "requeued": int(total("moeserve_requeued_requests_total")), "restarts": int(restarts),
            "mean_recovery_s": round(seconds / restarts, 2) if restarts else None,
            "last_recovery_s": round(total("moeserve_last_recovery_seconds"), 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=150)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--fault-interval", type=float, default=15.0, help="mean seconds between faults")
    p.add_argument("--request-timeout", type=float, default=120.0, help="past it a request counts as hung")
    p.add_argument("--layout", default="--tp 2", help="the serve flags of the ranks (default: --tp 2, EP 2)")
    p.add_argument("--no-kv-store", action="store_true", help="no shared store (else redis-server if installed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    store = None
    if not args.no_kv_store and RedisServer.unavailable() is None:
        store = RedisServer(Path(tempfile.mkdtemp(prefix="chaos-redis-")), free_port()).start()
    err = tempfile.NamedTemporaryFile("w+", prefix="chaos-serve-", suffix=".log", delete=False)  # noqa: SIM115
    store_args = ["--kv-store", store.url] if store is not None else []
    proc, url, _ = serve_subprocess(*shlex.split(args.layout), "--kv-cache-memory", str(64 << 20),
                                    "--max-restarts", "1000", *store_args, stderr=err, timeout_s=300)
    try:
        report = asyncio.run(Chaos(args, proc, url, store).run())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if store is not None:
            store.kill()
    report.update(layout=args.layout, clients=args.clients, kv_store=store is not None, server_log=err.name)
    print(json.dumps(report, indent=1))
    bad = report["mismatched"] or report["hung"] or report["http_500"] or report["untyped"] or report["answered_twice"]
    return 1 if bad or not report["server_alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
