"""A ``moeserve serve`` subprocess warmed with some greedy completions, so that its expert-load counters have
something to show: the fixture of test_expert_load_http.py and test_expert_load_replicas.py."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from moeserve.frontend.testing import serve_subprocess


@contextmanager
def warmed_server(args: list[str], prompts: list[str], max_tokens: int) -> Iterator[str]:
    """``moeserve serve ARGS`` on free ports, each prompt completed once (greedy, ``max_tokens``, each
    answered 200); yields the HTTP base URL and stops the server at exit."""
    proc, url, _ = serve_subprocess(*args, timeout_s=300, stderr=subprocess.PIPE, text=True)
    try:
        for prompt in prompts:
            r = httpx.post(url + "/v1/completions", timeout=120, json={
                "model": "moeserve-default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            assert r.status_code == 200, r.text
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
