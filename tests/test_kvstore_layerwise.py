"""Layer-wise loading (kvstore/layer_ready.py) in real engines (the embedded model, float32 on CPU, so every
token must be identical) with a real ``redis-server``: a prefix from the store or the host tier is loaded
while the request's step runs, each layer waiting for its own blocks; the tokens are those of no store and of
waiting for the whole load, in one process and with pp=2 or tp=2 stage workers. A load that comes short in the middle
(a value cut after its first layers, or one whose checksum fails once every layer is in) drops the step's
token, recomputes the request, and frees what it held."""

from __future__ import annotations

import threading
import time

import pytest
import redis as redis_py
import torch
from redis_server import RedisServer

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams
from moeserve.kvstore.layer_ready import LayerReady
from moeserve.kvstore.prefix import block_hashes

BS = 16
BLOCK_BYTES = 5 * 128 * 4 * BS  # the embedded model: 5 layers x 128 latent values, float32
GEN = torch.Generator().manual_seed(5)
PROMPTS = [torch.randint(0, 1000, (n,), generator=GEN).tolist() for n in (90, 75)]  # 5 and 4 full blocks
PARAMS = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


def engine(**kw) -> Engine:
    kw.setdefault("kv_cache_memory", 64 * BLOCK_BYTES)
    return Engine(EngineConfig(max_num_batched_tokens=32, **kw))


def generate(e: Engine, prompts: list[list[int]]) -> list[list[int]]:
    return [e.generate([p], PARAMS)[0].output_token_ids for p in prompts]


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory):
    if RedisServer.unavailable() is not None:
        pytest.skip(RedisServer.unavailable())
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    e = engine(kv_host_memory=0)
    try:
        return generate(e, PROMPTS)
    finally:
        e.close()


def store(url: str, salt: str, **kw) -> tuple[list[list[int]], object]:
    """Engine A stores the prompts; returns A's tokens and its stage-0 layout."""
    a = engine(kv_store=url, kv_store_salt=salt, kv_host_memory=0, **kw)
    try:
        out = generate(a, PROMPTS)
        if hasattr(a.kv.connector.transport, "mover"):
            assert a.kv.connector.transport.mover.flush()
        return out, a.kv.connector.config.layouts[0]
    finally:
        a.close()


def serve(url: str, salt: str, layerwise: bool, **kw) -> tuple[list[list[int]], Engine]:
    """A fresh engine B serves the prompts from the store (closed on return)."""
    b = engine(kv_store=url, kv_store_salt=salt, kv_host_memory=0, kv_load_cost_rule=False, kv_layerwise=layerwise,
               **kw)
    try:
        out = generate(b, PROMPTS)
        assert b.kv.num_free_blocks == b.kv.num_blocks  # nothing held once the requests are done
        return out, b
    finally:
        b.close()


def test_layer_ready_releases_each_layer_as_it_lands_and_everything_at_the_end() -> None:
    ready = LayerReady([3, 4, 5])
    ready.start(7)
    passed: list[int] = []

    def step() -> None:
        for layer in (3, 4, 5):
            ready.wait([7, 99], layer)  # 99: a load already over (or never here) waits for nothing
            passed.append(layer)

    t = threading.Thread(target=step)
    t.start()
    time.sleep(0.05)
    assert passed == []
    ready.mark(7, 1)
    time.sleep(0.05)
    assert passed == [3]
    ready.finish(7)  # a failed load releases every layer (the coordinator drops the step)
    t.join(5)
    assert passed == [3, 4, 5] and not ready.busy()


def test_store_hit_layerwise_on_off_and_no_store_give_the_same_tokens(redis: RedisServer, reference) -> None:
    out_a, _ = store(redis.url, "one")
    on, b_on = serve(redis.url, "one", True)
    off, b_off = serve(redis.url, "one", False)
    assert out_a == reference and on == reference and off == reference
    for b, layerwise in ((b_on, 2), (b_off, 0)):
        stats = b.kv.connector.stats
        assert stats.store_hit_tokens == (5 + 4) * BS and stats.layerwise_loads == layerwise
        assert b.scheduler.num_rolled_back == 0


def test_host_tier_hit_layerwise_gives_the_same_tokens(reference) -> None:
    """A device cache of 7 blocks: each prompt evicts the other's, which come back from host memory (waiting
    for the whole load: tests/test_kvstore_engine.py)."""
    e = engine(kv_host_memory=8 << 20, kv_cache_memory=7 * BLOCK_BYTES, kv_layerwise=True)
    try:
        assert generate(e, PROMPTS) == reference
        assert generate(e, PROMPTS) == reference
        stats = e.kv.connector.stats
        assert stats.host_hit_tokens + e.kv.num_prefix_hit_tokens == (5 + 4) * BS  # the rest: still on device
        assert stats.host_hit_tokens >= 5 * BS and stats.layerwise_loads == 2
        assert e.kv.num_free_blocks == e.kv.num_blocks
    finally:
        e.close()


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"pp": 2}, {"tp": 2}], ids=["pp2", "tp2"])
def test_stage_workers_store_hit_layerwise_gives_the_same_tokens(redis: RedisServer, reference, layout) -> None:
    """Each rank loads its own stage's layers and each of its layers waits for its own blocks (pp=2: stage 1
    loads while stage 0 computes; tp=2: both ranks of the stage load the same blocks)."""
    salt = f"workers{sorted(layout.items())}"
    store(redis.url, salt, **layout)
    on, b_on = serve(redis.url, salt, True, **layout)
    assert on == reference
    assert b_on.kv.connector.stats.store_hit_tokens == (5 + 4) * BS and b_on.kv.connector.stats.layerwise_loads == 2


def test_a_load_short_in_the_middle_recomputes_and_frees_what_it_held(redis: RedisServer, reference) -> None:
    """Block 2 of prompt 0 is cut short after its header and first two layers (a layer read comes back empty,
    mid-load); block 1 of prompt 1 has one bit flipped in its last layer (the checksum fails once every layer
    is in). Each time the step that ran over the load is dropped and the request recomputed from the damaged
    block, with the same tokens, and nothing stays held."""
    _, layout = store(redis.url, "short")
    client = redis_py.Redis.from_url(redis.url)
    cut = layout.key(block_hashes(PROMPTS[0], BS)[2])
    client.set(cut, client.get(cut)[:layout.head_bytes + 2 * BLOCK_BYTES // 5])
    flipped = layout.key(block_hashes(PROMPTS[1], BS)[1])
    value = bytearray(client.get(flipped))
    value[-3] ^= 0x40
    client.set(flipped, bytes(value))
    out, b = serve(redis.url, "short", True)
    assert out == reference
    stats = b.kv.connector.stats
    assert b.scheduler.num_rolled_back == 2 and stats.layerwise_loads == 2
    assert stats.store_hit_tokens == (2 + 1) * BS and stats.corrupt_blocks == 1  # the blocks before the damage
