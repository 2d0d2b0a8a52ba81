"""Two decode instances behind the router (real processes, the embedded model on the CPU): one is killed while
it streams. Its stream ends with the typed error; the router marks it down and every later request goes to the
other decode instance and succeeds, with the colocated tokens; the killed instance gets no request after its
death (the router's own counters)."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import torch
from disagg_helpers import metric, start_router

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams
from moeserve.frontend.testing import serve_subprocess

MODEL = "moeserve-default"
PROMPTS = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(9)).tolist() for n in (41, 66)]
COMMON = ("--kv-cache-memory", str(32 << 20), "--kv-host-memory", "0")


def body(prompt: list[int], max_tokens: int = 6, **kw) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}


def colocated() -> list[str]:
    e = Engine(EngineConfig(kv_cache_memory=32 << 20, kv_host_memory=0))
    try:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        return [e.generate([p], params)[0].output_text or "" for p in PROMPTS]
    finally:
        e.close()


def instances(r_url: str) -> list[dict]:
    return httpx.get(r_url + "/health", timeout=5).json()["instances"]


def outstanding(r_url: str) -> dict[str, int]:
    return {i["url"]: i["outstanding"] for i in instances(r_url) if i["role"] == "decode"}


def up(r_url: str) -> set[str]:
    return {i["url"] for i in instances(r_url) if i["up"]}


def test_a_killed_decode_instance_gets_no_more_requests_and_the_other_serves() -> None:
    reference = colocated()
    popen = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs: list[subprocess.Popen] = []
    try:
        prefill, p_url, _ = serve_subprocess(*COMMON, "--disaggregation-mode", "prefill", **popen)
        procs.append(prefill)
        decodes = []
        for _ in range(2):
            proc, url, _ = serve_subprocess(*COMMON, "--disaggregation-mode", "decode", **popen)
            procs.append(proc)
            decodes.append((proc, url))
        router, r_url = start_router(p_url, [u for _, u in decodes])
        procs.append(router)
        # the first stream goes to decode instance A (the least loaded, first on ties) and keeps it busy, so the
        # second goes to B; B is killed mid-stream
        (_, live_url), (victim, dead_url) = decodes
        with httpx.stream("POST", r_url + "/v1/completions", json=body(PROMPTS[0], 300, stream=True),
                          timeout=60) as first:
            lines = first.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            events: list[dict] = []
            with httpx.stream("POST", r_url + "/v1/completions", json=body(PROMPTS[1], 300, stream=True),
                              timeout=60) as second:
                for line in second.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
                        if len(events) == 2:
                            assert outstanding(r_url) == {live_url: 1, dead_url: 1}
                            victim.kill()
            assert events[-1]["error"]["code"] == "decode_instance_failed"
            for _ in lines:  # the first stream, on the other instance, finishes
                pass
        deadline = time.monotonic() + 5
        while dead_url in up(r_url):
            assert time.monotonic() < deadline, "the router still counts the killed decode instance as up"
            time.sleep(0.1)
        before = metric(r_url, "moeserve_router_requests_total", role="decode", instance=dead_url)
        for i, prompt in enumerate(PROMPTS * 2):
            r = httpx.post(r_url + "/v1/completions", json=body(prompt), timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[i % 2], r.text
        assert metric(r_url, "moeserve_router_requests_total", role="decode", instance=dead_url) == before
        assert metric(r_url, "moeserve_router_requests_total", role="decode", instance=live_url,
                      outcome="ok") >= 4
    finally:
        for proc in procs[::-1]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
