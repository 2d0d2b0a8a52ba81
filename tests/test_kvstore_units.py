"""The KV store's parts below the engine: the circuit breaker, the host index, and a
TierManager + BlockMover pair moving real cache tensors through the host tier and an in-process store (the
stored block format and its hash and keys: test_kvstore_block_format.py; the store writes: test_kvstore_writes.py)."""

from __future__ import annotations

import pytest
import torch
from redis_server import RedisServer

from moeserve.kvstore.block_format import BlockLayout
from moeserve.kvstore.block_pool import BlockPool
from moeserve.kvstore.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from moeserve.kvstore.latent_cache import allocate_latent_caches, stacked_view
from moeserve.kvstore.mover import BlockMover
from moeserve.kvstore.prefix import block_hashes
from moeserve.kvstore.store import MemoryStore, RedisStore, StoreError
from moeserve.kvstore.tiers import HostIndex, TierConfig, TierManager
from moeserve.kvstore.transport import LocalTransport

FP = "0123456789abcdef0123456789abcdef"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYOUT = BlockLayout(FP, "float32", 4, 0, 0, 2, 3)


def test_stacked_view_only_over_evenly_spaced_views_of_one_tensor() -> None:
    caches = allocate_latent_caches([2, 3, 4], 5, 4, 3, torch.float32, torch.device("cpu"))
    stacked = stacked_view([caches[2], caches[3], caches[4]])
    assert stacked is not None and stacked.shape == (3, 5, 4, 3)
    stacked[1, 2].fill_(7.0)
    assert bool((caches[3][2] == 7.0).all()) and not bool((caches[2] == 7.0).any())
    skipping = stacked_view([caches[2], caches[4]])  # every other layer: still evenly spaced
    assert skipping is not None and skipping[1].data_ptr() == caches[4].data_ptr()
    assert stacked_view([caches[3], caches[2]]) is None  # out of order
    assert stacked_view([torch.zeros(5, 4, 3), torch.zeros(5, 4, 3)]) is None  # two tensors


def test_breaker_opens_probes_and_closes() -> None:
    now = [0.0]
    b = CircuitBreaker(failure_threshold=3, probe_interval_s=5, clock=lambda: now[0])
    assert not b.failure() and not b.failure() and b.allow()
    assert b.failure() and b.state == OPEN and not b.allow()
    now[0] = 5.0
    assert b.allow() and b.state == HALF_OPEN and not b.allow()  # one probe at a time
    b.failure()
    assert b.state == OPEN and b.num_opened == 1 and not b.allow()
    now[0] = 10.0
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.num_closed == 1 and b.allow()


def test_host_index_is_lru_and_checks_tokens() -> None:
    idx = HostIndex(2)
    assert idx.insert(1, (1,)) == 0 and idx.insert(2, (2,)) == 1 and idx.insert(1, (1,)) is None
    assert idx.lookup(2, (9,)) is None
    assert idx.lookup(2, (2,)) == 1  # now 1 is the least recently used
    assert idx.insert(3, (3,)) == 0
    assert idx.lookup(1, (1,)) is None and idx.lookup(2, (2,)) == 1 and HostIndex(0).insert(1, (1,)) is None


def make_tiers(host_blocks: int, store: MemoryStore | None, cost_rule: bool = True,
               device: str = "cpu", stacked: bool = False) -> tuple[TierManager, dict]:
    """``stacked``: the caches are views of one tensor, as the runner allocates them (blocks move in one op for
    every layer); else one tensor a layer (blocks move layer by layer)."""
    torch.manual_seed(0)
    caches = {i: torch.randn(8, 4, 3).to(device) for i in range(2)}
    if stacked:
        views = allocate_latent_caches([0, 1], 8, 4, 3, torch.float32, torch.device(device))
        for i, view in views.items():
            view.copy_(caches[i])
        caches = views
        assert stacked_view([caches[0], caches[1]]) is not None
    mover = BlockMover(caches, LAYOUT, host_blocks, store)
    return TierManager(TierConfig(4, host_blocks, (LAYOUT,), cost_rule), LocalTransport(mover), store), caches


def load_prefix(tiers: TierManager, hashes: list[int], tokens: list[tuple[int, ...]], pool: BlockPool) -> list[int]:
    """What the cache manager does with a connector: plan, allocate, load (on the worker's thread), wait, and
    free what did not arrive. Returns the blocks that hold the first blocks of the prefix."""
    plan = tiers.plan_load(hashes, tokens, None)
    if plan is None:
        return []
    blocks = pool.allocate(min(plan.num_blocks, pool.num_free))
    tiers.begin_load("r", plan, blocks)
    tiers.send_ops()
    done = tiers.finished_loads()
    while not done:
        tiers.wait(5.0)
        done = tiers.finished_loads()
    assert [d.request_id for d in done] == ["r"]
    pool.free(blocks[done[0].num_blocks:][::-1])
    return blocks[:done[0].num_blocks]


def save(tiers: TierManager, blocks: list[int], hashes: list[int], tokens: list[tuple[int, ...]]) -> None:
    tiers.save(blocks, hashes, tokens)
    tiers.send_ops()
    assert tiers.transport.mover.flush()  # type: ignore[attr-defined]


@pytest.mark.parametrize("stacked", [False, True], ids=["a-tensor-a-layer", "one-tensor"])
@pytest.mark.parametrize("device", DEVICES)
def test_blocks_come_back_from_host_and_store_bit_equal(device: str, stacked: bool) -> None:
    """On a CUDA device: the saves' copies into the pinned host slots and the write queue's pinned slots (on a
    stream of their own), and the host loads' copies from them, all asynchronous; the blocks still come back
    bit-equal, the caches overwritten right after the save."""
    store = MemoryStore()
    tiers, caches = make_tiers(4, store, device=device, stacked=stacked)
    tokens = [tuple(range(i * 4, i * 4 + 4)) for i in range(3)]
    hashes = block_hashes([t for block in tokens for t in block], 4)
    want = [torch.stack([caches[i][b] for i in range(2)]) for b in (0, 1, 2)]
    save(tiers, [0, 1, 2], hashes, tokens)
    for cache in caches.values():
        cache.zero_()
    pool = BlockPool(8)
    pool.allocate(5)  # blocks 0..4 in use: the load gets 5, 6, 7
    got = load_prefix(tiers, hashes, tokens, pool)
    assert got == [5, 6, 7] and tiers.stats.host_hit_tokens == 12
    for block, w in zip(got, want):
        assert torch.equal(torch.stack([caches[i][block] for i in range(2)]), w)
    # the host index forgets them: they come from the store, and still bit-equal
    tiers.host = HostIndex(4)
    pool2 = BlockPool(8)
    got2 = load_prefix(tiers, hashes, tokens, pool2)
    assert len(got2) == 3 and tiers.stats.store_hit_tokens == 12
    for block, w in zip(got2, want):
        assert torch.equal(torch.stack([caches[i][block] for i in range(2)]), w)


def test_a_corrupt_stored_block_ends_the_prefix_and_frees_the_rest() -> None:
    store = MemoryStore()
    tiers, _ = make_tiers(0, store)
    tokens = [tuple(range(i * 4, i * 4 + 4)) for i in range(3)]
    hashes = block_hashes([t for block in tokens for t in block], 4)
    save(tiers, [0, 1, 2], hashes, tokens)
    key = LAYOUT.key(hashes[1])
    value = bytearray(store.get([key])[0] or b"")
    value[-1] ^= 0xFF
    store.put([(key, bytes(value))])
    pool = BlockPool(8)
    assert len(load_prefix(tiers, hashes, tokens, pool)) == 1
    assert pool.num_free == 7 and tiers.stats.corrupt_blocks == 1


def test_cost_rule_skips_loads_slower_than_recomputing() -> None:
    store = MemoryStore()
    tiers, _ = make_tiers(0, store)
    tokens = [(1, 2, 3, 4)]
    hashes = block_hashes([1, 2, 3, 4], 4)
    save(tiers, [0], hashes, tokens)
    tiers.store_s_per_block, tiers.prefill_s_per_token = 1.0, 0.001  # a block loads in 1 s, computes in 4 ms
    assert load_prefix(tiers, hashes, tokens, BlockPool(4)) == [] and tiers.stats.loads_skipped == 1
    tiers.store_s_per_block = 0.001
    assert len(load_prefix(tiers, hashes, tokens, BlockPool(4))) == 1


def test_a_full_write_queue_drops_instead_of_waiting() -> None:
    """A save of more blocks than the write queue has room for writes the first ones and drops (counts) the
    rest, without waiting for the writer."""
    store = MemoryStore()
    tiers, caches = make_tiers(0, store)
    mover = tiers.transport.mover  # type: ignore[attr-defined]
    mover.writer.max_pending = 2
    tokens = [tuple(range(i * 4, i * 4 + 4)) for i in range(3)]
    hashes = block_hashes([t for b in tokens for t in b], 4)
    mover.save([0, 1, 2], [-1] * 3, hashes, tokens, [True] * 3)
    assert mover.counters.writes_dropped == 1
    assert mover.flush() and mover.counters.blocks_written == 2
    assert store.lookup([LAYOUT.key(h) for h in hashes]) == 2  # the prefix's first two blocks are stored


def test_cluster_toml_kvstore_table(tmp_path) -> None:
    from moeserve.launch.cli import build_parser
    from moeserve.launch.cluster_config import ClusterError
    from moeserve.launch.cmd_launch import merged_settings
    from moeserve.launch.engine_args import engine_config

    parser = build_parser()
    defaults = vars(parser.parse_args(["launch", "cluster"]))
    cfg = tmp_path / "cluster.toml"
    cfg.write_text('[cluster]\nhosts = ["10.0.0.1"]\n\n[kvstore]\nurl = "redis://:pw@10.0.0.9:6379/0"\n'
                   'host_memory = 0\nsalt = "file"\ncost_rule = false\n')
    args = parser.parse_args(["launch", "cluster", "--config", str(cfg), "--kv-store-salt", "flag"])
    merged_settings(args, defaults)
    config = engine_config(args)
    assert (config.kv_store, config.kv_host_memory, config.kv_store_salt, config.kv_load_cost_rule) == \
        ("redis://:pw@10.0.0.9:6379/0", 0, "flag", False)  # a flag wins over the file
    cfg.write_text('[kvstore]\nadress = "redis://h:1/0"\n')
    with pytest.raises(ClusterError, match="adress"):
        merged_settings(parser.parse_args(["launch", "cluster", "--config", str(cfg)]), defaults)


@pytest.mark.skipif(RedisServer.unavailable() is not None, reason="needs redis-server")
def test_store_reads_values_in_place_over_a_password_and_a_db(tmp_path) -> None:
    """RedisStore.read_into (the RESP reader, kvstore/resp_reader.py) against a real redis-server with a
    password and db 3: values land in the given parts, in order; a missing key is -1, a value of another
    length is skipped (the parts keep their bytes) and the next value still lands; a wrong password is a
    StoreError."""
    with RedisServer(tmp_path, password="pw") as server:
        url = server.url.removesuffix("/0") + "/3"
        store = RedisStore(url, read_connections=2)
        store.put([("a", b"0123456789"), ("b", b"xyz"), ("c", bytes(range(256)) * 300)])
        parts = [[memoryview(bytearray(4)), memoryview(bytearray(6))] for _ in range(4)]
        parts[3] = [memoryview(bytearray(76_800))]
        assert store.read_into(["a", "missing", "b", "c"], parts) == [10, -1, 3, 76_800]
        assert bytes(parts[0][0]) + bytes(parts[0][1]) == b"0123456789"
        assert bytes(parts[2][0]) == bytes(4)  # 3 bytes for 10 bytes of parts: not written
        assert bytes(parts[3][0]) == bytes(range(256)) * 300
        assert store.read_into(["a"], [[memoryview(bytearray(10))]]) == [10]  # a pooled connection again
        assert store.stats().bytes_read == 10 + 3 + 76_800 + 10
        wrong = RedisStore(url.replace(":pw@", ":nope@"))
        with pytest.raises(StoreError, match="refused"):
            wrong.read_into(["a"], [[memoryview(bytearray(10))]])


def test_one_steps_saves_travel_as_one_message_and_come_back_bit_equal() -> None:
    """Saves recorded in one step (each a request whose block filled) go to the ranks as one KvSaveMsg, and the
    blocks still come back from the host pool bit-equal; a save that reuses a host slot of the message before it
    (a host pool of 2 slots) starts a message of its own, so that the later copy is the one kept."""
    tiers, caches = make_tiers(2, None)
    tokens = [tuple(range(i * 4, i * 4 + 4)) for i in range(3)]
    hashes = [block_hashes(list(t), 4)[0] for t in tokens]  # three one-block prefixes
    want = [torch.stack([caches[i][b] for i in range(2)]) for b in (0, 1, 2)]
    tiers.save([0], hashes[:1], tokens[:1])
    tiers.save([1], hashes[1:2], tokens[1:2])
    assert len(tiers._ops) == 1 and tiers._ops[0].blocks == [0, 1]
    tiers.save([2], hashes[2:], tokens[2:])  # the pool is full: it takes slot 0 again
    assert len(tiers._ops) == 2 and tiers._ops[1].host_slots == tiers._ops[0].host_slots[:1]
    tiers.send_ops()
    assert tiers.transport.mover.flush()  # type: ignore[attr-defined]
    for cache in caches.values():
        cache.zero_()
    for b in (1, 2):
        pool = BlockPool(8)
        pool.allocate(5)
        got = load_prefix(tiers, [hashes[b]], [tokens[b]], pool)
        assert len(got) == 1 and torch.equal(torch.stack([caches[i][got[0]] for i in range(2)]), want[b])


def test_one_steps_store_writes_travel_as_one_message_and_come_back_bit_equal() -> None:
    """With store writes on too, a step's saves are one KvSaveMsg (one gather on the ranks, not one a request),
    and every block comes back from the store bit-equal."""
    store = MemoryStore()
    tiers, caches = make_tiers(0, store)
    tokens = [tuple(range(i * 4, i * 4 + 4)) for i in range(3)]
    hashes = [block_hashes(list(t), 4)[0] for t in tokens]
    want = [torch.stack([caches[i][b] for i in range(2)]) for b in (0, 1, 2)]
    for b in range(3):
        tiers.save([b], hashes[b:b + 1], tokens[b:b + 1])
    assert len(tiers._ops) == 1 and tiers._ops[0].blocks == [0, 1, 2] and tiers._ops[0].to_store == [True] * 3
    tiers.send_ops()
    assert tiers.transport.mover.flush()  # type: ignore[attr-defined]
    for cache in caches.values():
        cache.zero_()
    for b in range(3):
        pool = BlockPool(8)
        pool.allocate(5)
        got = load_prefix(tiers, [hashes[b]], [tokens[b]], pool)
        assert len(got) == 1 and torch.equal(torch.stack([caches[i][got[0]] for i in range(2)]), want[b])


def test_reader_times_out_on_a_server_that_stops_mid_value() -> None:
    """A store that sends part of a value and then nothing: the RESP reader's one receive of the value (blocking,
    its timeout kept by the kernel) gives up after the timeout with a TimeoutError (an OSError: the breaker counts
    it), and the pool drops that connection instead of reusing it."""
    import socket
    import threading
    import time

    from moeserve.kvstore.resp_reader import RespPool

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            conn.recv(1 << 16)  # the MGET
            conn.sendall(b"*1\r\n$100000\r\n" + bytes(1000))  # a tenth of the value, then silence

    threading.Thread(target=serve, daemon=True).start()
    pool = RespPool(f"redis://127.0.0.1:{port}/0", 0.3, 2)
    for _ in range(2):
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="0.3 s"):
            pool.mget_into(["k"], [[memoryview(bytearray(100_000))]])
        assert 0.25 < time.monotonic() - start < 5
    assert len(conns) == 2  # the stalled connection was not reused
    listener.close()
    for conn in conns:
        conn.close()



class _Shards(MemoryStore):
    """An in-process store whose keys have homes, as a sharded store's do: the home is the block hash mod ``n``."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def shard_of(self, key: str) -> int:
        return int(key.rsplit(":", 1)[1], 16) % self.n


@pytest.mark.parametrize("servers,threads", [(1, 4), (2, 4), (4, 4), (4, 2), (3, 2)])
def test_a_layerwise_load_gives_each_thread_one_span_on_its_servers(servers: int, threads: int) -> None:
    """Every position exactly once, in order within a span, at most one span a thread, and a span on one server
    wherever there are as many threads as servers."""
    from moeserve.kvstore.load_spans import homes, thread_spans

    store = _Shards(servers)
    hashes = list(range(1000, 1037))
    spans = thread_spans(homes(store, [LAYOUT.key(h) for h in hashes]), threads)
    assert sorted(i for span in spans for i in span) == list(range(len(hashes)))
    assert len(spans) <= threads and all(span == sorted(span) for span in spans)
    if threads >= servers:
        assert all(len({hashes[i] % servers for i in span}) == 1 for span in spans)
    assert thread_spans(homes(store, []), threads) == []
