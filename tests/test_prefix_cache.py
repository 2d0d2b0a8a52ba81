"""Automatic prefix caching: the block pool's hash index and LRU reuse, the cache manager's matching (whole
blocks, never the last token), and an engine whose greedy tokens are the same with and without prefix hits."""

from __future__ import annotations

import pytest

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams
from moeserve.kvstore.block_pool import BlockPool
from moeserve.kvstore.cache_manager import KVCacheManager
from moeserve.kvstore.prefix import block_hashes


def test_pool_keeps_freed_blocks_cached_and_reuses_the_oldest_first() -> None:
    pool = BlockPool(3)
    a = pool.allocate(2)
    pool.register(a[0], 11, (1, 2))
    pool.free(a)
    assert pool.num_free == 3 and pool.lookup(11, (1, 2)) == a[0]
    assert pool.lookup(11, (9, 9)) is None  # same hash, other tokens: a collision is a miss
    pool.touch(a[0])
    assert pool.num_free == 2
    pool.free([a[0]])
    fresh = pool.allocate(2)  # the never-used block and a[1] go before the cached a[0] (LRU)
    assert a[0] not in fresh and pool.lookup(11, (1, 2)) == a[0]
    pool.allocate(1)  # now a[0] is handed out for new tokens: evicted
    assert pool.lookup(11, (1, 2)) is None and pool.num_cached == 0


def test_manager_matches_whole_blocks_and_never_the_last_token() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 112))  # 3 full blocks
    assert kv.match_prefix("a", tokens) == 0
    kv.allocate_slots("a", 12)
    kv.cache_full_blocks("a", tokens, 12)
    kv.free("a")
    assert kv.num_free_blocks == 8
    assert kv.match_prefix("b", tokens) == 8  # all 3 blocks cached, but the last token must be computed
    assert kv.match_prefix("c", tokens + [5, 6]) == 12
    assert kv.match_prefix("d", tokens[:4] + [0] * 8) == 4
    b, c, d = (kv.table(r).block_ids for r in "bcd")
    assert c[:2] == b and d == b[:1] and len(c) == 3  # the same physical blocks, shared
    for rid in "bcd":
        kv.free(rid)
    assert kv.num_free_blocks == 8
    assert kv.num_prefix_hit_tokens == 24 and kv.num_prefix_query_tokens == 12 * 3 + 14
    assert block_hashes(tokens, 4)[:1] == block_hashes(tokens[:4], 4)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(kv_cache_memory=8 << 20, max_num_batched_tokens=64))


def run(engine: Engine, prompts: list[list[int]], n: int = 16) -> list[list[int]]:
    outs = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return [o.output_token_ids for o in outs]


def test_greedy_tokens_equal_with_and_without_prefix_hits(engine: Engine) -> None:
    tok = engine.tokenizer
    shared = tok.encode("import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n")
    prompts = [shared + tok.encode(s, add_bos=False) for s in ("    x = 1", "    return 0", "    print(")]
    engine.kv.enable_prefix_caching = False
    cold = [run(engine, [p])[0] for p in prompts]
    engine.kv.enable_prefix_caching = True
    hits0 = engine.kv.num_prefix_hit_tokens
    first = run(engine, [prompts[0]])  # fills the cache
    warm = run(engine, prompts[1:])  # both hit the shared prefix (and run as one batch)
    assert engine.kv.num_prefix_hit_tokens - hits0 >= 2 * (len(shared) // 16) * 16 > 0
    assert first + warm == cold
    again = run(engine, [prompts[0]])  # its own whole prompt and output blocks are cached now
    assert again == cold[:1]
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
