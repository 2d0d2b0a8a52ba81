"""Start to ``/health`` and the first requests of a server that was just started: is the first request any
slower than the next ones?

Start ``moeserve serve`` (any model, ``--skip-tokenizer-init`` is fine) and run this at the same moment; it
polls ``/health`` until 200, then sends ``--requests`` completions of ``--input-len`` token ids (fresh ones each,
no shared prefix) with ``--max-tokens`` greedy tokens, one after another, and prints the seconds of each.

    moeserve serve --model benchmarks/configs/deepseek_v2_lite --load-format dummy --skip-tokenizer-init \\
        --device cuda --port 8011 & python benchmarks/serve_first_requests.py --port 8011
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import urllib.error
import urllib.request


def wait_healthy(base: str, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1):
                return time.perf_counter() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise SystemExit(f"no /health 200 within {timeout:.0f} s")


def served_model(base: str) -> str:
    with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as resp:
        return json.loads(resp.read())["data"][0]["id"]


def complete(base: str, model: str, prompt: list[int], max_tokens: int) -> float:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    print(f"polling from {datetime.datetime.now().isoformat(sep=' ', timespec='milliseconds')}")
    print(f"start to /health 200: {wait_healthy(base, args.timeout):.1f} s")
    model = served_model(base)
    for i in range(args.requests):
        prompt = [(1000 * (i + 1) + 7 * j) % 30000 + 100 for j in range(args.input_len)]
        print(f"request {i}: {complete(base, model, prompt, args.max_tokens):.3f} s")


if __name__ == "__main__":
    main()
