"""The ZeroMQ token RPC against a real server (uvicorn + ROUTER socket on free ports, the embedded model):
streams equal the engine run alone, return fields, abort / disconnect free the cache at once, resume after a
reconnect, a reader that never reads delays nobody, busy and auth errors, and a 10,000-frame fuzz."""

from __future__ import annotations

import random
import time

import msgpack
import pytest
import zmq

from moeserve.client import Client, RpcError
from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams
from moeserve.frontend.errors import ERROR_CODES
from moeserve.frontend.limits import ServerLimits
from moeserve.frontend.server_config import ServerConfig
from moeserve.frontend.testing import BackgroundServer

TIMEOUT_S = 20
ENGINE = EngineConfig(kv_cache_memory=16 << 20, max_num_seqs=64)
PROMPTS = ["def fib(n):", "import os\n", "class Stack:", "for i in range(10):"]


def greedy(n: int) -> dict:
    return {"max_tokens": n, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def alone() -> dict[str, list[int]]:
    """Each prompt's 24 greedy tokens, run alone on a plain engine."""
    engine = Engine(ENGINE)
    return {p: engine.generate([p], SamplingParams(**greedy(24)))[0].output_token_ids for p in PROMPTS}


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(ServerConfig(engine=ENGINE, port=0, rpc_port=0)) as s:
        yield s


def engine_idle(s: BackgroundServer, timeout: float = 10.0) -> tuple[int, int]:
    """Wait until the engine holds no request; returns (free blocks, total blocks)."""
    engine = s.server._engines[0].engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.requests and not engine.has_unfinished():
            break
        time.sleep(0.01)
    return engine.kv.num_free_blocks, engine.kv.num_blocks


def test_streams_equal_alone_and_return_fields(server, alone) -> None:
    with Client(server.rpc_address, timeout_s=TIMEOUT_S) as c:
        assert c.ping()["ready"] is True
        streams = [c.generate(p, request_id=f"s{i}", return_fields=["logprobs", "timings", "expert_trace",
                                                                         "token_ids"], **greedy(24))
                   for i, p in enumerate(PROMPTS)]
        frames = [list(s) for s in streams]
    for p, fs in zip(PROMPTS, frames):
        tokens, final = fs[:-1], fs[-1]
        assert [f["seq"] for f in fs] == list(range(len(fs)))  # one increasing seq per request
        ids = [t for f in tokens for t in f["token_ids"]]
        assert ids == alone[p] == final["output_token_ids"]
        assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 24
        assert all(len(f["logprobs"]) == len(f["token_ids"]) and f["logprobs"][0] <= 0 for f in tokens)
        trace = [e for f in tokens for e in f["expert_ids"]]  # [tokens][moe layers][top_k]
        assert len(trace) == 24 and all(len(t) == 4 and all(len(k) == 2 for k in t) for t in trace)
        timings = final["timings"]
        assert timings["ttft_s"] > 0 and timings["queue_s"] >= 0 and len(timings["itl_s"]) == 23
    with Client(server.rpc_address, timeout_s=TIMEOUT_S) as c:  # a request alone gives the same expert trace as in a batch
        solo = c.complete(PROMPTS[0], return_fields=["expert_trace"], **greedy(24))
    assert solo.expert_ids == [e for f in frames[0][:-1] for e in f["expert_ids"]]


def test_non_streaming_and_sampling_errors(server, alone) -> None:
    with Client(server.rpc_address, timeout_s=TIMEOUT_S) as c:
        r = c.complete(token_ids=[0, 5, 9], stream=False, **greedy(6))
        assert len(r.token_ids) == 6 and r.finish_reason == "length"
        r = c.complete(PROMPTS[1], stream=False, return_fields=["logprobs"], **greedy(24))
        assert r.token_ids == alone[PROMPTS[1]] and len(r.logprobs) == 24
        for params, code in [({"temperature": -1}, "bad_request"), ({"max_tokens": 10**9}, "limit_exceeded"),
                             ({"bogus": 1}, "bad_request"), ({"top_p": "high"}, "bad_request")]:
            with pytest.raises(RpcError) as e:
                c.complete("x", **params)
            assert e.value.code == code
        with pytest.raises(RpcError, match="vocabulary"):
            c.complete(token_ids=[10**6])


def test_abort_and_disconnect_free_blocks(server) -> None:
    free0, total = engine_idle(server)
    assert free0 == total
    with Client(server.rpc_address, timeout_s=TIMEOUT_S) as c:
        frames = c.generate(PROMPTS[0], request_id="ab", **greedy(400))
        assert next(frames)["type"] == "token"
        c.abort("ab")
        rest = list(frames)
        assert rest[-1]["type"] == "final" and rest[-1]["finish_reason"] == "abort"
    assert engine_idle(server) == (free0, total)
    c = Client(server.rpc_address, timeout_s=TIMEOUT_S)  # a client that goes away mid-stream
    frames = c.generate(PROMPTS[1], **greedy(400))
    next(frames), next(frames)
    c.close()
    assert engine_idle(server) == (free0, total)


def test_resume_after_reconnect(server, alone) -> None:
    first = Client(server.rpc_address, timeout_s=TIMEOUT_S)
    frames = first.generate(PROMPTS[2], request_id="res-1", resumable=True, **greedy(24))
    got = [next(frames) for _ in range(3)]
    first.close()  # the connection drops; the request goes on into its buffer
    with Client(server.rpc_address, timeout_s=TIMEOUT_S) as second:
        got += list(second.resume("res-1", last_seq=got[-1]["seq"]))
        assert [f["seq"] for f in got] == list(range(len(got)))
        assert [t for f in got[:-1] for t in f["token_ids"]] == alone[PROMPTS[2]]
        with pytest.raises(RpcError) as e:
            list(second.resume("never-started", last_seq=0))
        assert e.value.code == "not_found"


def test_bad_params_name_the_field(server) -> None:
    with Client(server.rpc_address, timeout_s=TIMEOUT_S) as c:
        for params, message in (
                ({"max_tokens": -1}, "field 'params.max_tokens': must be an integer >= 1, got -1"),
                ({"top_k": -2}, "field 'params.top_k': must be -1 or 0 (off) or an integer >= 1, got -2"),
                ({"best_of": 2}, "unknown field 'params.best_of'")):
            with pytest.raises(RpcError) as e:
                c.complete("x", **params)
            assert (e.value.code, e.value.message) == ("bad_request", message)


def test_reader_that_never_reads_delays_nobody(server, alone) -> None:
    ctx = zmq.Context()
    stalled = ctx.socket(zmq.DEALER)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.connect(server.rpc_address)
    stalled.send(msgpack.packb({"type": "generate", "request_id": "stall", "prompt": PROMPTS[3],
                                "params": greedy(300)}))
    t0 = time.monotonic()
    with Client(server.rpc_address, timeout_s=TIMEOUT_S) as c:
        r = c.complete(PROMPTS[0], **greedy(24))
    assert r.token_ids == alone[PROMPTS[0]]
    assert time.monotonic() - t0 < 30
    stalled.close(linger=0)
    ctx.term()
    engine_idle(server)


def test_busy_and_auth() -> None:
    cfg = ServerConfig(engine=ENGINE, port=0, rpc_port=0, api_key="k1,k2",
                       limits=ServerLimits(max_queued_requests=2, max_tokens_in_flight=2000))
    with BackgroundServer(cfg) as s:
        with Client(s.rpc_address, timeout_s=TIMEOUT_S) as c, pytest.raises(RpcError) as e:
            c.ping()
        assert e.value.code == "unauthorized"
        with Client(s.rpc_address, api_key="wrong", timeout_s=TIMEOUT_S) as c, pytest.raises(RpcError) as e:
            c.complete("x")
        assert e.value.code == "unauthorized"
        with Client(s.rpc_address, api_key="k2", timeout_s=TIMEOUT_S) as c:
            streams = [c.generate(token_ids=[0, i + 3], **greedy(300)) for i in range(4)]
            outcomes = []
            for st in streams:
                try:
                    outcomes.append(list(st)[-1]["finish_reason"])
                except RpcError as err:
                    outcomes.append(err.code)
        assert "busy" in outcomes and outcomes.count("length") >= 1


# ---- fuzz ----

VALID = [
    {"v": 1, "type": "generate", "request_id": "f", "prompt": "def f():", "params": {"max_tokens": 2}},
    {"v": 1, "type": "generate", "request_id": "g", "token_ids": [0, 7], "params": {"temperature": 0},
     "stream": False, "return": ["timings"]},
    {"v": 1, "type": "ping", "nonce": 3},
    {"v": 1, "type": "abort", "request_id": "f"},
    {"v": 1, "type": "resume", "request_id": "g", "last_seq": 0},
]
ODD_VALUES = [None, True, -1, 0, 2**63, -(2**63), 1.5, float("nan"), float("inf"), "", "é" * 40, b"\xff\xfe",
              [], [1, "a"], {"a": 1}, {"max_tokens": -5}, [[[[[]]]]], "x" * 5000, 10**18]


def mutate(rng: random.Random) -> bytes:
    base = dict(rng.choice(VALID))
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 1:  # flip, drop or insert bytes of a valid frame
        raw = bytearray(msgpack.packb(base))
        for _ in range(rng.randrange(1, 4)):
            op, i = rng.randrange(3), rng.randrange(len(raw))
            if op == 0:
                raw[i] ^= 1 << rng.randrange(8)
            elif op == 1:
                del raw[i]
            else:
                raw.insert(i, rng.randrange(256))
        return bytes(raw)
    if kind == 2:
        return msgpack.packb(base)[:rng.randrange(1, 20)]
    if kind == 3:  # a field with a value of another type or range
        base[rng.choice(list(base) + ["params", "token_ids", "last_seq"])] = rng.choice(ODD_VALUES)
    elif kind == 4:
        del base[rng.choice(list(base))]
    elif kind == 5:
        base[rng.choice(["extra", "Type", "", "params2"])] = rng.choice(ODD_VALUES)
    elif kind == 6:  # a str whose bytes are not UTF-8
        return msgpack.packb(base)[:-1] + b"\xa2\xc3\x28"
    else:
        return msgpack.packb(rng.choice(ODD_VALUES))
    return msgpack.packb(base)


def test_fuzz_10000_frames_then_a_normal_request() -> None:
    limits = ServerLimits(max_tokens=4, max_prompt_tokens=32, max_frame_bytes=4096, max_queued_requests=32)
    with BackgroundServer(ServerConfig(engine=ENGINE, port=0, rpc_port=0, limits=limits)) as s:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(s.rpc_address)
        rng = random.Random(1234)
        frames = [mutate(rng) for _ in range(10_000)]
        frames += [b"\x80" + b"\x00" * 5000, msgpack.packb({"type": "ping", "pad": "x" * 20000})]  # oversized
        replies: list[dict] = []

        def drain(wait_ms: int) -> bool:
            got = False
            while sock.poll(wait_ms):
                replies.append(msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False))
                got, wait_ms = True, 0
            return got

        for i, frame in enumerate(frames):
            sock.send(frame)
            if i % 100 == 0:
                drain(0)
        sock.send_multipart([b"two", b"frames"])
        while drain(2000):
            pass
        terminal = [r for r in replies if r["type"] in ("error", "final", "pong")]
        assert len(terminal) >= len(frames) * 0.95
        codes = {r["code"] for r in replies if r["type"] == "error"}
        assert codes <= ERROR_CODES - {"internal", "engine_error"}
        assert {"bad_frame", "bad_request", "frame_too_large"} <= codes
        sock.close(linger=0)
        ctx.term()
        assert all(not t.done() for t in s.server.rpc._tasks)  # the server loop never died
        with Client(s.rpc_address, timeout_s=TIMEOUT_S) as c:
            assert len(c.complete("def f():", **greedy(4)).token_ids) == 4
