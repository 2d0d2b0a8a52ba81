"""The host tier and the shared store inside real engines (the embedded model, float32 on CPU, so every
token must be identical), with a real ``redis-server`` started on a free port: engine B loads what engine A
stored, for prompts that end on a block boundary, inside a block, or are prefilled in chunks; pp=2 and tp=2
layouts store and load their own layers; a corrupted value is a miss; a wrong password stops the start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from redis_server import RedisServer

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams
from moeserve.kvstore.prefix import block_hashes
from moeserve.kvstore.store import StoreConfigError
from moeserve.kvstore.tier_setup import STORE_ENV

NO_REDIS = RedisServer.unavailable()
needs_redis = pytest.mark.skipif(NO_REDIS is not None, reason=f"store tests need redis-server: {NO_REDIS}")
BS = 16
GEN = torch.Generator().manual_seed(1)
SHARED = torch.randint(0, 1000, (48,), generator=GEN).tolist()
PROMPTS = [SHARED + [7],  # 3 full blocks + 1: the last token is always computed
           SHARED[:32],  # ends exactly on a block boundary: 1 block stored for reuse, the last one computed
           SHARED + torch.randint(0, 1000, (37,), generator=GEN).tolist()]  # 5 full blocks, a partial one
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
CHUNK = 24  # max_num_batched_tokens: long prompts are prefilled in chunks that cross blocks


BLOCK_BYTES = 5 * 128 * 4 * BS  # the embedded model: 5 layers x 128 latent values, float32


def engine(**kw) -> Engine:
    kw.setdefault("kv_cache_memory", 64 * BLOCK_BYTES)
    return Engine(EngineConfig(max_num_batched_tokens=CHUNK, **kw))


def generate(e: Engine, prompts: list[list[int]]) -> list[list[int]]:
    return [o.output_token_ids for o in e.generate(prompts, PARAMS)]


def loadable_tokens(prompts: list[list[int]]) -> int:
    return sum((len(p) - 1) // BS * BS for p in prompts)


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    e = engine(kv_host_memory=0)
    try:
        return [generate(e, [p])[0] for p in PROMPTS]  # one at a time: nothing shared, nothing stored
    finally:
        e.close()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory):
    if NO_REDIS is not None:
        pytest.skip(NO_REDIS)
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def write_then_read(url: str, salt: str, a: dict, b: dict) -> tuple[Engine, list[list[int]], list[list[int]]]:
    """Engine A (layout ``a``) computes and stores the prompts, one by one; engine B (layout ``b``) serves them
    from the store. Returns B (closed) and both outputs."""
    ea = engine(kv_store=url, kv_store_salt=salt, kv_host_memory=0, **a)
    specs = getattr(ea.executor, "specs", [])
    assert all(url not in spec.to_json() for spec in specs if url == os.environ.get(STORE_ENV))
    try:
        out_a = [generate(ea, [p])[0] for p in PROMPTS]
        if hasattr(ea.kv.connector.transport, "mover"):  # one process: wait for its writer
            assert ea.kv.connector.transport.mover.flush()
    finally:
        ea.close()  # stage workers finish their queued writes before they exit
    eb = engine(kv_store=url, kv_store_salt=salt, kv_load_cost_rule=False, **b)
    try:
        out_b = [generate(eb, [p])[0] for p in PROMPTS]
    finally:
        eb.close()
    return eb, out_a, out_b


def test_host_tier_brings_evicted_blocks_back() -> None:
    """A device cache of 4 blocks; three prompts of 2 full blocks each (3 blocks with their tokens), visited
    twice: the first visit computes everything (nothing to find), the second finds every full block in host
    memory (the device evicted them), and the tokens do not change."""
    prompts = [torch.randint(0, 1000, (40,), generator=GEN).tolist() for _ in range(3)]
    e = engine(kv_host_memory=8 << 20, kv_cache_memory=4 * BLOCK_BYTES)
    try:
        assert e.kv.num_blocks == 4
        first = [generate(e, [p])[0] for p in prompts]
        assert e.kv.connector.stats.host_hit_tokens == 0 and e.kv.connector.stats.host_bytes_written > 0
        again = [generate(e, [p])[0] for p in prompts]
        assert e.kv.connector.stats.host_hit_tokens == 3 * 2 * BS and e.kv.num_prefix_hit_tokens == 0
        assert again == first
    finally:
        e.close()


@needs_redis
def test_engine_b_serves_engine_a_prefixes_from_the_store(redis: RedisServer, reference) -> None:
    eb, out_a, out_b = write_then_read(redis.url, "one-process", {}, {})
    assert out_a == reference and out_b == reference
    # prompt 1 is a prefix of prompts 0 and 2: after B loaded prompt 0, prompt 1's block is in its device cache
    stats = eb.kv.connector.stats
    assert stats.store_hit_tokens + eb.kv.num_prefix_hit_tokens + stats.host_hit_tokens == loadable_tokens(PROMPTS)
    assert stats.store_hit_tokens >= 3 * BS and stats.corrupt_blocks == 0


@needs_redis
def test_pp2_and_tp2_each_stage_stores_and_loads_its_layers(redis: RedisServer, reference,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """pp=2 writes one key per block and stage; pp=2 x tp=2 reads them (tp does not change what is stored).
    The URL comes from MOESERVE_KV_STORE, which the ranks inherit: it is on no rank's command line."""
    monkeypatch.setenv(STORE_ENV, redis.url)
    eb, out_a, out_b = write_then_read(redis.url, "pp2", {"pp": 2}, {"pp": 2, "tp": 2})
    assert out_a == reference and out_b == reference
    assert eb.kv.connector.stats.store_hit_tokens >= 3 * BS
    keys = redis.cli("--scan", "--pattern", "moeserve:kv1:*").split()
    layouts = eb.kv.connector.config.layouts
    full = {h for p in PROMPTS for h in block_hashes(p, BS)}
    for layout in layouts:  # every full block of every prompt, once per stage
        assert {layout.key(h) for h in full} <= set(keys)
    assert len({k for k in keys if layouts[0].key_prefix in k or layouts[1].key_prefix in k}) == 2 * len(full)


@needs_redis
def test_a_store_of_two_servers_shares_the_blocks_between_them(reference, tmp_path: Path) -> None:
    """``--kv-store URL,URL``: engine A's blocks are spread over both servers, engine B loads them from both with
    the same tokens; with one server killed, C still loads the prefix up to the first block that lived there."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with RedisServer(tmp_path / "a") as redis, RedisServer(tmp_path / "b") as second:
        url = f"{redis.url},{second.url}"
        eb, out_a, out_b = write_then_read(url, "two-servers", {}, {})
        assert out_a == reference and out_b == reference
        assert eb.kv.connector.stats.store_hit_tokens >= 3 * BS
        prefix = eb.kv.connector.config.layouts[0].key_prefix
        on_first = sum(prefix in k for k in redis.cli("--scan", "--pattern", "moeserve:kv1:*").split())
        on_second = sum(prefix in k for k in second.cli("--scan", "--pattern", "moeserve:kv1:*").split())
        assert on_first > 0 and on_second > 0
        assert on_first + on_second == len({h for p in PROMPTS for h in block_hashes(p, BS)})
        layout = eb.kv.connector.config.layouts[0]
        homes = [eb.kv.connector.store.shard_of(layout.key(h)) for h in block_hashes(PROMPTS[2], BS)]
        victim = 1 - homes[0]  # the server without the first block: the prefix ends at its first block
        (second if victim == 1 else redis).kill()
        ec = engine(kv_store=url, kv_store_salt="two-servers", kv_store_timeout=0.5, kv_load_cost_rule=False,
                    kv_host_memory=0)
        try:
            assert generate(ec, [PROMPTS[2]]) == [reference[2]]
            want = homes.index(victim) if victim in homes else len(homes)
            assert ec.kv.connector.stats.store_hit_tokens == want * BS > 0
        finally:
            ec.close()


@needs_redis
def test_a_corrupted_stored_value_is_a_miss(redis: RedisServer, reference) -> None:
    import redis as redis_py

    ea = engine(kv_store=redis.url, kv_store_salt="corrupt", kv_host_memory=0)
    generate(ea, [PROMPTS[2]])
    assert ea.kv.connector.transport.mover.flush()
    layout = ea.kv.connector.config.layouts[0]
    ea.close()
    client = redis_py.Redis.from_url(redis.url)
    key = layout.key(block_hashes(PROMPTS[2], BS)[1])
    value = bytearray(client.get(key))
    value[-3] ^= 0x40  # one bit of the latent of block 1
    client.set(key, bytes(value))
    eb = engine(kv_store=redis.url, kv_store_salt="corrupt", kv_host_memory=0, kv_load_cost_rule=False)
    try:
        assert generate(eb, [PROMPTS[2]]) == [reference[2]]
        assert eb.kv.connector.stats.store_hit_tokens == BS and eb.kv.connector.stats.corrupt_blocks == 1
    finally:
        eb.close()


@needs_redis
def test_write_buffer_sets_the_write_slots_and_a_full_one_drops_the_prompts_end(redis: RedisServer) -> None:
    """``kv_store_write_buffer`` sizes the writing rank's slots; with room for one block, the blocks a step saves
    beyond it are dropped (counted), and what was stored is still a usable prefix."""
    ea = engine(kv_store=redis.url, kv_store_salt="small-buffer", kv_host_memory=0,
                kv_store_write_buffer=BLOCK_BYTES + 64)
    mover = ea.kv.connector.transport.mover
    try:
        assert mover.writer.max_pending == 1
        generate(ea, [PROMPTS[2]])  # 5 full blocks, saved 1-2 a step
        assert mover.flush()
        stored, dropped = mover.counters.blocks_written, mover.counters.writes_dropped
        assert dropped > 0 and stored + dropped == 5
    finally:
        ea.close()
    eb = engine(kv_store=redis.url, kv_store_salt="small-buffer", kv_host_memory=0, kv_load_cost_rule=False)
    try:
        eb.generate([PROMPTS[2]], PARAMS)
        assert 0 < eb.kv.connector.stats.store_hit_tokens <= stored * BS
    finally:
        eb.close()


@needs_redis
def test_wrong_or_missing_password_is_a_clear_error_at_start(tmp_path: Path) -> None:
    with RedisServer(tmp_path, password="s3cret") as server:
        for url in (server.url.replace("s3cret", "wrong"), server.url.replace(":s3cret@", "")):
            with pytest.raises(StoreConfigError, match="refused to authenticate"):
                engine(kv_store=url)
        proc = subprocess.run([sys.executable, "-m", "moeserve.launch.cli", "generate", "--kv-store",
                               server.url.replace("s3cret", "wrong"), "--max-tokens", "2", "x"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "refused to authenticate" in proc.stderr
        assert "wrong" not in proc.stderr and "Traceback" not in proc.stderr  # the password is not echoed
        e = engine(kv_store=server.url)  # the right one works
        e.close()


def test_bench_prints_prefix_hit_rates(capsys: pytest.CaptureFixture[str]) -> None:
    from moeserve.launch.cmd_bench import print_table, run_benchmark

    e = engine()
    try:
        result = run_benchmark(e, 4, 8, 2, progress=False, shared_prefix_len=48)
    finally:
        e.close()
    rates = result["prefix_hit_rate"]
    assert rates["device"] > 0.5 and rates["store"] == 0  # 3 of 4 prompts find the 48-token head
    print_table(result)
    assert "prefix hits" in capsys.readouterr().out
