"""``--kv-store URL,URL``: keys spread over two real redis-servers (kvstore/sharded_store.py): every call answers in
the order of its keys, and a server that is down costs only its own keys."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from redis_server import RedisServer

from moeserve.kvstore.sharded_store import ShardedStore
from moeserve.kvstore.store import StoreConfigError, StoreError, check_store_url, redact
from moeserve.kvstore.tier_setup import open_store

pytestmark = pytest.mark.skipif(RedisServer.unavailable() is not None, reason=str(RedisServer.unavailable()))

KEYS = [f"k{i}" for i in range(40)]


def value(key: str) -> bytes:
    return key.encode() * 100


@contextmanager
def stored_on_two_servers(tmp_path, timeout_s: float) -> Iterator[tuple[RedisServer, RedisServer, ShardedStore]]:
    """Two fresh redis-servers and a store over both, every key of KEYS put."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with RedisServer(tmp_path / "a") as a, RedisServer(tmp_path / "b") as b:
        store = open_store(f"{a.url},{b.url}", timeout_s=timeout_s)
        assert isinstance(store, ShardedStore)
        store.put([(k, value(k)) for k in KEYS])
        yield a, b, store


def test_keys_spread_over_both_servers_and_come_back_in_order(tmp_path) -> None:
    with stored_on_two_servers(tmp_path, 2.0) as (a, b, store):
        held = [int(a.cli("dbsize")), int(b.cli("dbsize"))]
        assert min(held) > 5 and sum(held) == len(KEYS)  # both take a share, each key once
        assert store.lookup(KEYS) == len(KEYS)
        assert store.get(KEYS + ["missing"]) == [value(k) for k in KEYS] + [None]
        dests = [[memoryview(bytearray(3)), memoryview(bytearray(len(value(k)) - 3))] for k in KEYS]
        assert store.read_into(KEYS, dests) == [len(value(k)) for k in KEYS]
        assert [bytes(d[0]) + bytes(d[1]) for d in dests] == [value(k) for k in KEYS]
        ranges = [(k, 2) for k in KEYS]
        slices = [[memoryview(bytearray(5))] for _ in KEYS]
        assert store.read_ranges_into(ranges, slices) == [5] * len(KEYS)
        assert [bytes(s[0]) for s in slices] == [value(k)[2:7] for k in KEYS]
        home = store.shards[store.shard_of(KEYS[17])]
        (a if home is store.shards[0] else b).cli("del", KEYS[17])
        assert store.lookup(KEYS) == 17  # the longest stored prefix, over both servers
        stats = store.stats()
        assert stats.bytes_written == sum(len(value(k)) for k in KEYS) and stats.bytes_read > 0


def test_a_server_down_costs_only_its_own_keys(tmp_path) -> None:
    with stored_on_two_servers(tmp_path, 0.5) as (_a, b, store):
        b.kill()
        on_b = [store.shard_of(k) == 1 for k in KEYS]
        assert store.lookup(KEYS) == on_b.index(True)
        got = store.get(KEYS)
        assert [g is None for g in got] == on_b
        assert all(g == value(k) for g, k in zip(got, KEYS) if g is not None)
        with pytest.raises(StoreError, match="shard 1"):
            store.put([(k, b"new") for k in KEYS])
        assert [store.get([k])[0] == b"new" for k in KEYS if store.shard_of(k) == 0] == [True] * on_b.count(False)
        assert store.stats().errors >= 3 and store.stats().breaker_state == 0  # server a still takes writes


def test_urls_are_checked_and_redacted_one_by_one() -> None:
    check_store_url("redis://:pw@h1:1/0,redis://h2:2/0")
    with pytest.raises(StoreConfigError, match="port"):
        check_store_url("redis://h1:1/0,redis://:pw@h2:99999/0")
    assert redact("redis://:pw@h1:1/0,redis://u:x@h2:2/0") == "redis://:***@h1:1/0,redis://u:***@h2:2/0"
    with pytest.raises(ValueError, match="two servers"):
        ShardedStore([open_store("memory://")])


def test_a_load_over_two_servers_reads_each_chunk_from_one_and_ends_at_a_missing_block(tmp_path) -> None:
    """StoreLoader over a sharded store: each chunk's keys live on one server (one round trip a chunk), every block
    lands bit-equal in its cache block, and a block missing from one server ends the prefix at its position."""
    import torch

    from moeserve.kvstore.block_format import BlockLayout, encode_block
    from moeserve.kvstore.load_spans import chunk_spans, homes
    from moeserve.kvstore.prefix import block_hashes
    from moeserve.kvstore.store_load import StoreLoader

    layers, bs, dim, n = 2, 4, 8, 24
    layout = BlockLayout("0123456789abcdef0123456789abcdef", "float32", bs, 0, 0, layers, dim)
    ids = list(range(500, 500 + n * bs))
    hashes = block_hashes(ids, bs)
    tokens = [ids[i * bs:(i + 1) * bs] for i in range(n)]
    latent = torch.randn(n, layers, bs, dim, generator=torch.Generator().manual_seed(5))
    raw = latent.view(torch.uint8).reshape(n, -1).numpy()
    with stored_on_two_servers(tmp_path, 2.0) as (a, b, store):
        store.put([(layout.key(h), encode_block(layout, h, t, raw[i].data))
                   for i, (h, t) in enumerate(zip(hashes, tokens))])
        caches = [torch.zeros(n + 1, bs, dim) for _ in range(layers)]
        loader = StoreLoader(caches, layout, store, 3)
        loader.chunk_blocks = 3
        home_of = [store.shard_of(layout.key(h)) for h in hashes]
        spans = chunk_spans(homes(store, [layout.key(h) for h in hashes]), 3)
        assert sorted(i for span in spans for i in span) == list(range(n))
        assert all(len({home_of[i] for i in span}) == 1 for span in spans)
        blocks = list(range(1, n + 1))
        r = loader.load(hashes, tokens, blocks)
        assert (r.num_ok, r.num_corrupt) == (n, 0)
        for j in range(layers):
            assert torch.equal(caches[j][1:], latent[:, j])
        victim = 13
        (a if home_of[victim] == 0 else b).cli("del", layout.key(hashes[victim]))
        assert loader.load(hashes, tokens, blocks).num_ok == victim
        loader.close()
