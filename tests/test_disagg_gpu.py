"""Prefill/decode disaggregation on one CUDA device (skipped without one): a prefill instance and a decode
instance share the GPU, each with a part of its memory (``--gpu-memory-utilization``), and ``moeserve router``
sits in front. Greedy tokens through the router equal those of a colocated instance on the same device and
dtype (float32, so that computing a prompt in one chunk or as a pulled prefix plus a suffix cannot flip a
greedy token), and the decode instance did pull the prompts' blocks, by ZeroMQ and (when installed) by NIXL
(CUDA IPC between the two processes).
"""

from __future__ import annotations

import subprocess

import httpx
import pytest
import torch
from disagg_helpers import metric, nixl_missing, start_router

from moeserve.frontend.testing import serve_subprocess

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODEL = "moeserve-default"
GEN = torch.Generator().manual_seed(5)
PROMPTS = [torch.randint(0, 1000, (n,), generator=GEN).tolist() for n in (333, 120, 450)]
MAX_TOKENS = 12
# each instance takes this fraction of the memory free when it starts: the three fit on one GPU
COMMON = ("--device", "cuda", "--dtype", "float32", "--gpu-memory-utilization", "0.15", "--kv-host-memory", "0")


def complete(url: str, prompt: list[int]) -> str:
    r = httpx.post(url + "/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def colocated() -> list[str]:
    proc, url, _ = serve_subprocess(*COMMON, timeout_s=600, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
    try:
        return [complete(url, p) for p in PROMPTS]
    finally:
        proc.kill()
        proc.wait(60)


@pytest.mark.parametrize("backend", ["zmq", "nixl"])
def test_two_roles_on_one_gpu_stream_the_colocated_tokens(backend: str, colocated: list[str]) -> None:
    if backend == "nixl" and nixl_missing() is not None:
        pytest.skip(f"the nixl package is not usable: {nixl_missing()}")
    popen = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    args = (*COMMON, "--kv-transfer-backend", backend)
    procs = []
    try:
        prefill, p_url, _ = serve_subprocess(*args, "--disaggregation-mode", "prefill", timeout_s=600, **popen)
        procs.append(prefill)
        decode, d_url, _ = serve_subprocess(*args, "--disaggregation-mode", "decode", timeout_s=600, **popen)
        procs.append(decode)
        router, r_url = start_router(p_url, d_url)
        procs.append(router)
        assert [complete(r_url, p) for p in PROMPTS] == colocated
        # every block short of the last token was pulled (64-token blocks on a GPU): (333-1)//64 + (120-1)//64 +
        # (450-1)//64 full blocks and the three prompts' tails, of 64 tokens x 128 latent values x float32 x 5 layers
        block_bytes = 64 * 128 * 4 * 5
        assert metric(d_url, "moeserve_kv_transfer_bytes_total", role="decode") == (5 + 1 + 7 + 3) * block_bytes
        assert metric(d_url, "moeserve_kv_transfer_failures_total", role="decode") == 0
        assert metric(d_url, "moeserve_kv_transfer_seconds_count", role="decode") == len(PROMPTS)
    finally:
        for proc in procs[::-1]:
            proc.kill()
            proc.wait(60)
