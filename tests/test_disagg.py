"""Prefill/decode disaggregation with real processes on the CPU (the embedded model, float32): a prefill
instance, a decode instance (``moeserve serve --disaggregation-mode ...``) and ``moeserve router``, shared by
the tests of this module, which run in order (the last ones stop and kill instances).

Greedy tokens through the router equal one colocated engine's, and the decode instance did pull the prompt's
blocks; a wrong model fingerprint is refused (at the decode instance, at the transfer server, at the router's
start); a transfer that times out (the prefill instance stopped), a prefill instance killed after its
prefill and one killed while it holds the router's request cost a recompute on the decode side, never a failed
or duplicated request; a decode instance killed mid-stream ends
the stream with a typed error and the router stops sending to it within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgpack
import pytest
import torch
import zmq
from disagg_helpers import metric, nixl_missing, sse_text, start_router

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams
from moeserve.frontend.pd_router import DisaggRouter, RouterSetupError
from moeserve.frontend.testing import serve_subprocess

MODEL = "moeserve-default"
GEN = torch.Generator().manual_seed(3)
PROMPTS = [torch.randint(0, 1000, (n,), generator=GEN).tolist() for n in (53, 40, 70, 37, 45)]
MAX_TOKENS = 6


def body(prompt: list[int], **kw) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            **kw}


@pytest.fixture(scope="module")
def reference() -> list[str]:
    e = Engine(EngineConfig(kv_cache_memory=32 << 20, kv_host_memory=0))
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        return [e.generate([p], params)[0].output_text or "" for p in PROMPTS]
    finally:
        e.close()


@pytest.fixture(scope="module")
def deployment():
    common = ("--kv-cache-memory", str(32 << 20), "--kv-host-memory", "0")
    popen = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prefill, p_url, _ = serve_subprocess(*common, "--disaggregation-mode", "prefill", **popen)
    procs = [prefill]
    try:
        decode, d_url, _ = serve_subprocess(*common, "--disaggregation-mode", "decode", "--kv-transfer-timeout",
                                            "2", **popen)
        procs.append(decode)
        router, r_url = start_router(p_url, d_url)
        procs.append(router)
        yield {"prefill": prefill, "decode": decode, "router": router, "p_url": p_url, "d_url": d_url,
               "r_url": r_url}
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait(timeout=30)


def test_router_streams_the_tokens_of_one_colocated_engine(deployment, reference) -> None:
    r_url, d_url = deployment["r_url"], deployment["d_url"]
    for i, prompt in enumerate(PROMPTS[:3]):
        if i == 1:
            text, _ = sse_text(httpx.post(r_url + "/v1/completions", json=body(prompt, stream=True), timeout=120))
        else:
            r = httpx.post(r_url + "/v1/completions", json=body(prompt), timeout=120)
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["text"]
        assert text == reference[i]
    # the decode instance pulled every block short of the last token: 3 + 2 + 4 full blocks and each prompt's
    # partial last block (its tail: 52, 39 and 69 tokens are no whole blocks), so it computed one token each
    block_bytes = 16 * 128 * 4 * 5  # block size x latent dim x float32 x layers
    assert metric(d_url, "moeserve_kv_transfer_bytes_total", role="decode") == 12 * block_bytes
    assert metric(d_url, "moeserve_kv_transfer_failures_total", role="decode") == 0
    deadline = time.monotonic() + 5  # an idle engine's figures catch up every half second
    while metric(r_url, "moeserve_kv_transfer_bytes_total", role="prefill") != 12 * block_bytes:
        assert time.monotonic() < deadline, "the router does not show the prefill instance's transfers"
        time.sleep(0.2)
    assert metric(r_url, "moeserve_kv_transfer_seconds_count", role="decode") == 3
    # a chat completion through the router: the decode instance's own answer, computed without a transfer
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "def fib(n): " * 12}], "max_tokens": 6,
            "temperature": 0}
    routed = httpx.post(r_url + "/v1/chat/completions", json=chat, timeout=120)
    alone = httpx.post(d_url + "/v1/chat/completions", json=chat, timeout=120)
    assert routed.status_code == 200 and alone.status_code == 200, routed.text
    assert routed.json()["choices"][0]["message"] == alone.json()["choices"][0]["message"]
    assert metric(d_url, "moeserve_kv_transfer_seconds_count", role="decode") == 4


def test_a_mismatched_model_fingerprint_is_refused(deployment) -> None:
    params = {"transfer_id": "x", "remote_addr": "tcp://127.0.0.1:1", "fingerprint": "0" * 32}
    r = httpx.post(deployment["d_url"] + "/v1/completions", json=body(PROMPTS[0], kv_transfer_params=params),
                   timeout=60)
    assert r.status_code == 400 and "model fingerprint mismatch" in r.json()["error"]["message"]
    # the prefill instance's transfer server refuses a pull for another model, with the reason
    addr = httpx.get(deployment["p_url"] + "/v1/kv_transfer", timeout=10).json()["transfer_addr"]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    sock.send(msgpack.packb({"op": "resolve", "transfer_id": "x", "hashes": [], "fingerprint": "0" * 32,
                             "dtype": "float32", "block_size": 16, "kv_dim": 128}))
    assert sock.poll(10_000)
    head = msgpack.unpackb(sock.recv_multipart()[0])
    sock.close()
    assert not head["ok"] and "model fingerprint mismatch" in head["error"]
    # and the router does not start over instances of two models
    router = DisaggRouter(["http://p"], ["http://d"])
    with pytest.raises(RouterSetupError, match="model fingerprint mismatch"):
        router._check({"http://p": {"mode": "prefill", "fingerprint": "a" * 32},
                       "http://d": {"mode": "decode", "fingerprint": "b" * 32}})
    with pytest.raises(RouterSetupError, match="kv-transfer-backend"):
        router._check({"http://p": {"mode": "prefill", "fingerprint": "a" * 32, "backend": "zmq"},
                       "http://d": {"mode": "decode", "fingerprint": "a" * 32, "backend": "nixl"}})


@pytest.mark.skipif(nixl_missing() is not None, reason="the nixl package is not installed")
def test_the_nixl_backend_reads_the_same_blocks(reference) -> None:
    """Both roles with --kv-transfer-backend nixl: descriptors over the control socket, the bytes by a NIXL
    read (UCX between two processes of this machine); the tokens are the colocated ones."""
    common = ("--kv-cache-memory", str(32 << 20), "--kv-host-memory", "0", "--kv-transfer-backend", "nixl")
    popen = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prefill, p_url, _ = serve_subprocess(*common, "--disaggregation-mode", "prefill", **popen)
    try:
        decode, d_url, _ = serve_subprocess(*common, "--disaggregation-mode", "decode", **popen)
        try:
            pair = {"p_url": p_url, "d_url": d_url}
            assert prefill_then_decode(pair, PROMPTS[0], lambda: None) == reference[0]
            block_bytes = 16 * 128 * 4 * 5
            assert metric(d_url, "moeserve_kv_transfer_bytes_total", role="decode") == 4 * block_bytes  # 3 + tail
            assert metric(d_url, "moeserve_kv_transfer_failures_total", role="decode") == 0
            deadline = time.monotonic() + 5  # the prefill side counts the read once released
            while metric(p_url, "moeserve_kv_transfer_bytes_total", role="prefill") != 4 * block_bytes:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        finally:
            decode.kill()
            decode.wait(30)
    finally:
        prefill.kill()
        prefill.wait(30)


def test_a_pp2_prefill_instance_hands_over_to_a_tp2_decode_instance(reference) -> None:
    """Roles on other layouts (engines in this process, their ranks as processes): each stage of the prefill
    instance serves its layers, each decode rank pulls its own (tp ranks each their copy); same tokens."""
    from moeserve.kvstore.disagg import KvTransferParams

    kw = dict(kv_cache_memory=32 << 20, kv_host_memory=0)
    prefill = Engine(EngineConfig(pp=2, disaggregation_mode="prefill", **kw))
    try:
        decode = Engine(EngineConfig(tp=2, disaggregation_mode="decode", **kw))
        try:
            assert prefill.prefill_side is not None and len(prefill.prefill_side.server.sources) == 2
            for i in (0, 1):
                tid = uuid.uuid4().hex
                once = KvTransferParams(tid, do_remote_decode=True).to_json()
                prefill.generate([PROMPTS[i]], SamplingParams(max_tokens=1, temperature=0.0, kv_transfer=once))
                pull = KvTransferParams(tid, remote_addr=prefill.prefill_side.address,
                                        fingerprint=prefill.fingerprint).to_json()
                out = decode.generate([PROMPTS[i]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                                   ignore_eos=True, kv_transfer=pull))
                assert out[0].output_text == reference[i]
            snap = decode.kv.connector.snapshot()  # type: ignore[union-attr]
            block_bytes = 16 * 128 * 4 * 5
            # two tp ranks, each pulling (3 + 2) full blocks and the two prompts' tails
            assert snap["transfer_failures"] == 0 and snap["transfer_bytes"] == 2 * (3 + 2 + 2) * block_bytes
        finally:
            decode.close()
    finally:
        prefill.close()


def prefill_then_decode(deployment, prompt: list[int], between) -> str:  # noqa: ANN001
    """The router's two requests by hand, with ``between`` run after the prefill (stop or kill it)."""
    tid = uuid.uuid4().hex
    r = httpx.post(deployment["p_url"] + "/v1/completions", timeout=60,
                   json=body(prompt, max_tokens=1, kv_transfer_params={"transfer_id": tid, "do_remote_decode": True}))
    assert r.status_code == 200, r.text
    info = httpx.get(deployment["p_url"] + "/v1/kv_transfer", timeout=10).json()
    between()
    params = {"transfer_id": tid, "remote_addr": info["transfer_addr"], "fingerprint": info["fingerprint"]}
    r = httpx.post(deployment["d_url"] + "/v1/completions", json=body(prompt, kv_transfer_params=params), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_transfer_that_times_out_is_recomputed(deployment, reference) -> None:
    prefill, d_url = deployment["prefill"], deployment["d_url"]
    failures = metric(d_url, "moeserve_kv_transfer_failures_total", role="decode")
    start = time.monotonic()
    try:
        text = prefill_then_decode(deployment, PROMPTS[3], lambda: os.kill(prefill.pid, signal.SIGSTOP))
    finally:
        os.kill(prefill.pid, signal.SIGCONT)
    assert text == reference[3]
    assert time.monotonic() - start >= 2  # --kv-transfer-timeout 2
    assert metric(d_url, "moeserve_kv_transfer_failures_total", role="decode") == failures + 1


def test_a_prefill_instance_killed_costs_a_recompute_not_a_request(deployment, reference) -> None:
    prefill, d_url, r_url = deployment["prefill"], deployment["d_url"], deployment["r_url"]
    failures = metric(d_url, "moeserve_kv_transfer_failures_total", role="decode")
    text = prefill_then_decode(deployment, PROMPTS[4], lambda: (prefill.kill(), prefill.wait(30)))
    assert text == reference[4]
    assert metric(d_url, "moeserve_kv_transfer_failures_total", role="decode") == failures + 1
    # through the router: the prefill instance is gone, the decode instance computes the prompt
    r = httpx.post(r_url + "/v1/completions", json=body(PROMPTS[2]), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[2]


def test_a_prefill_instance_killed_holding_the_request_costs_a_recompute_once(deployment, reference) -> None:
    """A fresh prefill instance and router over the same decode instance: the prefill instance is stopped,
    the router sends it a prompt, and it is killed while it holds the request. The router's request to it
    fails, the decode instance computes the prompt: the client gets the colocated tokens, once."""
    popen = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prefill, p_url, _ = serve_subprocess("--kv-cache-memory", str(32 << 20), "--kv-host-memory", "0",
                                         "--disaggregation-mode", "prefill", **popen)
    router = None
    try:
        router, r_url = start_router(p_url, deployment["d_url"])
        os.kill(prefill.pid, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, r_url + "/v1/completions", json=body(PROMPTS[3]), timeout=60)
            time.sleep(1.0)  # the prompt is on its way to (and queued at) the stopped prefill instance
            assert not pending.done()
            prefill.kill()
            prefill.wait(30)
            r = pending.result()
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[3], r.text
        assert metric(r_url, "moeserve_router_requests_total", role="prefill", outcome="failed") == 1
        assert metric(r_url, "moeserve_router_requests_total", role="decode") == 1  # one decode, not two
    finally:
        for proc in (router, prefill):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(30)


def test_a_decode_instance_killed_fails_its_streams_and_gets_no_more_requests(deployment) -> None:
    decode, r_url = deployment["decode"], deployment["r_url"]
    long = body(PROMPTS[1], max_tokens=400, stream=True)
    events: list[dict] = []
    with httpx.stream("POST", r_url + "/v1/completions", json=long, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    decode.kill()
    assert len(events) > 3 and events[-1]["error"]["code"] == "decode_instance_failed"
    deadline = time.monotonic() + 5
    while httpx.get(r_url + "/health", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "the router still counts the killed decode instance as up"
        time.sleep(0.1)
    r = httpx.post(r_url + "/v1/completions", json=body(PROMPTS[0]), timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_decode_instance"
