"""What the disaggregation tests share (test_disagg.py, test_disagg_gpu.py): the router started as a process,
a metric read from a /metrics page, an SSE body's text, and whether NIXL can run here."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx

from moeserve.frontend.testing import free_port


def start_router(prefill: str, decode: str | list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    decodes = [decode] if isinstance(decode, str) else decode
    proc = subprocess.Popen([sys.executable, "-m", "moeserve.launch.cli", "router", "--prefill", prefill,
                             "--decode", *decodes, "--port", str(port), "--health-interval", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited: {proc.communicate()[1]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("router not up")


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a series' samples that carry ``labels`` on the /metrics page at ``url``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def sse_text(response: httpx.Response) -> tuple[str, list[dict]]:
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices")), events


def nixl_missing() -> str | None:
    from moeserve.kvstore.nixl_transfer import NixlUnavailable, _nixl_api

    try:
        _nixl_api()
    except NixlUnavailable as e:
        return str(e)
    return None
