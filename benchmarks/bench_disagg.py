"""Decode ITL under a mixed load: disaggregated (prefill instance + decode instance + router) against one
colocated instance, in one run.

The load, for ``--duration`` seconds: ``--chats`` clients that each stream short completions back to back
(``--chat-len`` prompt tokens, ``--chat-tokens`` new tokens), plus a long prompt (``--long-len`` tokens,
``--long-tokens`` new tokens) sent every ``--long-every`` seconds. The figure is the inter-token latency of the
short chats' streams (client side, SSE arrival times): p50 and p99, and their ratio. Prompts are random token
ids, the model's weights as given (``--load-format dummy`` for random ones).

The two roles must not share compute for the comparison to mean anything: give each its own GPU
(``--prefill-env CUDA_VISIBLE_DEVICES=0 --decode-env CUDA_VISIBLE_DEVICES=1``), or its own cores
(``--prefill-cpus 0-7 --decode-cpus 8-15``: ``taskset``), or the GPU to decode and host cores to prefill
(``--prefill-device cpu --dtype bfloat16``: the roles must share a cache dtype). The colocated instance gets
the decode instance's device and environment.
The router (``--router-cpus``) and this script's own load generator (``--client-cpus``) can be pinned too, so
that neither takes the decode instance's cores; ``--profile-decode DIR`` records the decode instance (and the
colocated one) with py-spy (``pip install py-spy``), and the decode instance's own ITL (its /metrics histogram, p50 and p99
read off it as Prometheus's histogram_quantile would) is reported beside the client's.

Two H200s of one host, a role on each (or drop the env flags and give --prefill-device cpu --dtype bfloat16 for the host cores):
    PYTHONPATH=. python benchmarks/bench_disagg.py --model benchmarks/configs/deepseek_v2_lite --load-format dummy \\
        --device cuda --prefill-env CUDA_VISIBLE_DEVICES=0 --decode-env CUDA_VISIBLE_DEVICES=1 \\
        --chats 16 --long-len 8192 --long-every 2 --duration 60 --json-out benchmarks/results/disagg_h200.json
The GPU machine's 16-core host, roles on disjoint cores (the colocated instance gets cores 0-13):
    PYTHONPATH=. python benchmarks/bench_disagg.py --prefill-cpus 0-7 --decode-cpus 8-13 --router-cpus 14-15 \\
        --client-cpus 14-15 --chats 8 --long-len 2048 --long-every 2 --duration 60 --max-model-len 4096
CPU, disjoint cores (the embedded model, its rotary table stretched: MOESERVE_ALLOW_LONG_MAX_MODEL_LEN=1):
    PYTHONPATH=. python benchmarks/bench_disagg.py --prefill-cpus 0 --decode-cpus 1 --chats 4 --long-len 1024 \\
        --long-every 3 --duration 30 --max-model-len 4096
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from moeserve.frontend.testing import free_port


def cpu_set(cpus: str) -> set[int]:
    """``0-7,9`` -> {0, ..., 7, 9}."""
    out: set[int] = set()
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def start(cmd: list[str], env_items: list[str], cpus: str, wait_url: str, timeout_s: float = 900) -> subprocess.Popen:
    env = dict(os.environ, **dict(item.split("=", 1) for item in env_items))
    prefix = ["taskset", "-c", cpus] if cpus else []
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "moeserve.launch.cli", *cmd], env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with code {proc.returncode}")
        try:
            if httpx.get(wait_url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"{cmd[0]} not up in {timeout_s} s")


def serve_cmd(args, port: int, device: str, mode: str = "") -> list[str]:
    cmd = ["serve", "--port", str(port), "--rpc-port", str(free_port()), "--device", device,
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--kv-host-memory", "0"]
    if args.model:
        cmd += ["--model", args.model, "--load-format", args.load_format]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.dtype:  # NOTE: one dtype for both roles: a CPU prefill instance defaults to float32, a GPU to bf16
        cmd += ["--dtype", args.dtype]
    if args.kv_cache_memory:
        cmd += ["--kv-cache-memory", str(args.kv_cache_memory)]
    if mode:
        cmd += ["--disaggregation-mode", mode, "--kv-transfer-backend", args.kv_transfer_backend]
    return cmd


async def chat_client(url: str, model: str, args, rng: random.Random, stop: float, itls: list[float]) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        while time.monotonic() < stop:
            body = {"model": model, "prompt": [rng.randrange(1000) for _ in range(args.chat_len)],
                    "max_tokens": args.chat_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
            last = None
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.monotonic()
                    if last is not None:
                        itls.append(now - last)
                    last = now


async def long_client(url: str, model: str, args, rng: random.Random, stop: float) -> int:
    sent = 0
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = []
        while time.monotonic() < stop:
            body = {"model": model, "prompt": [rng.randrange(1000) for _ in range(args.long_len)],
                    "max_tokens": args.long_tokens, "temperature": 0, "ignore_eos": True}
            tasks.append(asyncio.create_task(client.post(url + "/v1/completions", json=body)))
            sent += 1
            await asyncio.sleep(args.long_every)
        await asyncio.gather(*tasks, return_exceptions=True)
    return sent


def profile(proc: subprocess.Popen, args, name: str) -> subprocess.Popen | None:
    """py-spy, attached to ``proc`` for the load's duration (``--profile-decode DIR``)."""
    if not args.profile_decode:
        return None
    args.profile_decode.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--subprocesses", "--nonblocking", "--rate", "250",
                             "--duration", str(int(args.duration) + 2), "--format", "speedscope", "-o",
                             str(args.profile_decode / f"{name}.speedscope.json")])


def server_itl(url: str) -> dict[str, float]:
    """The instance's own ITL histogram (/metrics), as cumulative fractions per upper bound in seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "moeserve_inter_token_latency_seconds_bucket":
                buckets[s.labels["le"]] = buckets.get(s.labels["le"], 0.0) + s.value
    total = buckets.get("+Inf", 0.0)
    return {le: round(n / total, 4) for le, n in buckets.items()} if total else {}


def quantile(fractions: dict[str, float], q: float) -> float:
    """The ``q`` quantile (seconds) of a histogram given as ``server_itl``'s cumulative fractions, linear inside
    the bucket it falls in (as Prometheus's ``histogram_quantile``); nan without samples."""
    edges = sorted((float(le), f) for le, f in fractions.items() if le != "+Inf")
    lo, below = 0.0, 0.0
    for le, f in edges:
        if f >= q:
            return lo + (le - lo) * ((q - below) / (f - below) if f > below else 1.0)
        lo, below = le, f
    return lo if edges else float("nan")


def own_itl(url: str, key: str) -> dict:
    """An instance's own ITL histogram, and its p50 and p99 read off it."""
    fractions = server_itl(url)
    p50, p99 = quantile(fractions, 0.5), quantile(fractions, 0.99)
    return {f"{key}_le": fractions, f"{key}_p50_s": p50, f"{key}_p99_s": p99, f"{key}_p99_over_p50": p99 / p50}


async def load(url: str, args) -> dict:
    """The mixed load against ``url``, from this process (pinned to ``--client-cpus`` meanwhile)."""
    before = os.sched_getaffinity(0)
    if args.client_cpus:
        os.sched_setaffinity(0, cpu_set(args.client_cpus))
    try:
        return await _load(url, args)
    finally:
        os.sched_setaffinity(0, before)


async def _load(url: str, args) -> dict:
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    stop = time.monotonic() + args.duration
    itls: list[float] = []
    rng = random.Random(0)
    results = await asyncio.gather(long_client(url, model, args, rng, stop),
                                   *(chat_client(url, model, args, random.Random(i + 1), stop, itls)
                                     for i in range(args.chats)))
    itls.sort()
    p50 = statistics.median(itls) if itls else 0.0
    p99 = itls[int(0.99 * (len(itls) - 1))] if itls else 0.0
    return {"itl_p50_s": p50, "itl_p99_s": p99, "p99_over_p50": p99 / p50 if p50 else 0.0,
            "chat_tokens": len(itls), "long_prompts": results[0]}


def run_disagg(args) -> dict:
    p_port, d_port, r_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    spy = None
    try:
        procs.append(start(serve_cmd(args, p_port, args.prefill_device or args.device, "prefill"),
                           args.prefill_env, args.prefill_cpus, f"http://127.0.0.1:{p_port}"))
        procs.append(start(serve_cmd(args, d_port, args.device, "decode"), args.decode_env, args.decode_cpus,
                           f"http://127.0.0.1:{d_port}"))
        procs.append(start(["router", "--prefill", f"http://127.0.0.1:{p_port}", "--decode",
                            f"http://127.0.0.1:{d_port}", "--port", str(r_port)], [], args.router_cpus,
                           f"http://127.0.0.1:{r_port}"))
        spy = profile(procs[1], args, "decode")
        out = asyncio.run(load(f"http://127.0.0.1:{r_port}", args))
        return out | own_itl(f"http://127.0.0.1:{d_port}", "decode_server_itl")
    finally:
        if spy is not None:
            spy.wait()
        for p in procs:
            p.kill()
            p.wait()


def run_colocated(args) -> dict:
    port = free_port()
    cpus = ",".join(c for c in (args.prefill_cpus, args.decode_cpus) if c)
    proc = start(serve_cmd(args, port, args.device), args.decode_env, args.colocated_cpus or cpus,
                 f"http://127.0.0.1:{port}")
    spy = profile(proc, args, "colocated")
    try:
        out = asyncio.run(load(f"http://127.0.0.1:{port}", args))
        return out | own_itl(f"http://127.0.0.1:{port}", "server_itl")
    finally:
        if spy is not None:
            spy.wait()
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="cpu", help="the decode instance's (and the colocated one's) device")
    p.add_argument("--prefill-device", default="", help="the prefill instance's device (default: --device)")
    p.add_argument("--prefill-env", nargs="*", default=[], metavar="VAR=VALUE")
    p.add_argument("--decode-env", nargs="*", default=[], metavar="VAR=VALUE")
    p.add_argument("--prefill-cpus", default="", help="taskset core list of the prefill instance")
    p.add_argument("--decode-cpus", default="", help="taskset core list of the decode instance")
    p.add_argument("--colocated-cpus", default="", help="the colocated instance's (default: prefill's and decode's)")
    p.add_argument("--router-cpus", default="", help="taskset core list of the router")
    p.add_argument("--client-cpus", default="", help="cores of this script's load generator")
    p.add_argument("--profile-decode", type=Path, help="write py-spy profiles of the decode/colocated instance here")
    p.add_argument("--kv-transfer-backend", default="zmq", choices=("zmq", "nixl"))
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--dtype", default="", help="every instance's --dtype (default: each device's own)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory", type=int, default=0)
    p.add_argument("--chats", type=int, default=8)
    p.add_argument("--chat-len", type=int, default=128)
    p.add_argument("--chat-tokens", type=int, default=64)
    p.add_argument("--long-len", type=int, default=2048)
    p.add_argument("--long-tokens", type=int, default=8)
    p.add_argument("--long-every", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--modes", default="colocated,disagg")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    out = {"args": vars(args) | {"json_out": str(args.json_out), "profile_decode": str(args.profile_decode)}}
    for mode in args.modes.split(","):
        out[mode] = run_disagg(args) if mode == "disagg" else run_colocated(args)
        print(mode, json.dumps(out[mode]), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
