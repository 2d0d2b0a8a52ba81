"""TierManager: the coordinator's view of the tiers below the device cache -- the host pool and the shared
store -- and every decision about them (the ranks' ``BlockMover``s only copy what they are told).

At admission the cache manager matches the device cache first; ``load_prefix`` then extends the match from
the host pool (``HostIndex``: chain hash -> slot, LRU), then from the store (the longest prefix stored for
every pipeline stage), loads those blocks into freshly allocated device blocks on every rank and returns the
ones that arrived. After each step ``save`` writes newly computed full blocks through to the host pool and
(through the ranks' bounded queues) to the store. A cost rule skips store loads that are estimated to take
longer than recomputing the same tokens (measured load time per block against measured prefill time per token).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from moeserve.comm.messages import KvLoadMsg, KvSaveMsg
from moeserve.kvstore.block_format import BlockLayout
from moeserve.kvstore.block_pool import BlockPool
from moeserve.kvstore.store import KVStore, StoreError
from moeserve.kvstore.transport import KvTransport

logger = logging.getLogger(__name__)

LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
EWMA = 0.3  # weight of the newest measurement


class HostIndex:
    """Which host-pool slot holds which block (by chain hash, with its tokens), least recently used first."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._slots: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()  # hash -> (slot, tokens)
        self._free = list(range(num_slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._slots)

    def lookup(self, chain_hash: int, tokens: tuple[int, ...]) -> int | None:
        entry = self._slots.get(chain_hash)
        if entry is None or entry[1] != tokens:
            return None
        self._slots.move_to_end(chain_hash)
        return entry[0]

    def insert(self, chain_hash: int, tokens: tuple[int, ...]) -> int | None:
        """A slot to copy this block into (evicting the least recently used), or None if it is held already."""
        if not self.num_slots:
            return None
        if chain_hash in self._slots:
            self._slots.move_to_end(chain_hash)
            return None
        slot = self._free.pop() if self._free else self._slots.popitem(last=False)[1][0]
        self._slots[chain_hash] = (slot, tokens)
        return slot


@dataclass(frozen=True)
class TierConfig:
    block_size: int
    host_blocks: int  # slots of the host pool (0 = no host tier)
    layouts: tuple[BlockLayout, ...]  # the stored form of each pipeline stage
    cost_rule: bool = True  # skip store loads estimated slower than recomputing

    @property
    def block_bytes(self) -> int:
        """Latent bytes of one block over every layer (all stages): what one stored block moves."""
        return sum(layout.payload_bytes for layout in self.layouts)


@dataclass
class TierStats:
    host_hit_tokens: int = 0
    store_hit_tokens: int = 0
    host_bytes_read: int = 0
    host_bytes_written: int = 0
    store_bytes_read: int = 0
    loads_skipped: int = 0  # store loads the cost rule judged slower than recomputing
    lookup_errors: int = 0
    corrupt_blocks: int = 0
    load_s_sum: float = 0.0
    load_s_buckets: tuple[int, ...] = (0,) * (len(LOAD_BUCKETS) + 1)


class TierManager:
    def __init__(self, config: TierConfig, transport: KvTransport, store: KVStore | None):
        """``store``: the coordinator's client (lookups)."""
        self.config = config
        self.transport = transport
        self.store = store
        self.host = HostIndex(config.host_blocks)
        self.stats = TierStats()
        self._load_id = 0
        self.store_s_per_block: float | None = None  # measured: one stored block into the device, all ranks
        self.prefill_s_per_token: float | None = None  # measured from steps that were mostly prefill
        self._load_s_since_step = 0.0

    # ---- loads ----
    def load_prefix(self, hashes: Sequence[int], tokens: Sequence[tuple[int, ...]], pool: BlockPool) -> list[int]:
        """Extend a device-cache match by the blocks ``hashes`` (their ``tokens``), in order: those found in the
        host pool, then in the store, go into fresh device blocks. Returns the device blocks that now hold the
        first ``len(result)`` of them (one reference each, not yet registered)."""
        host_slots: list[int] = []
        for h, t in zip(hashes, tokens):
            slot = self.host.lookup(h, t)
            if slot is None:
                break
            host_slots.append(slot)
        num_store = self._store_prefix(hashes[len(host_slots):])
        n = min(len(host_slots) + num_store, pool.num_free)
        if n == 0:
            return []
        host_slots, num_store = host_slots[:n], n - min(n, len(host_slots))
        blocks = pool.allocate(n)
        got = self._load(host_slots, blocks, hashes[len(host_slots):n], tokens[len(host_slots):n])
        used = len(host_slots) + got
        pool.free(blocks[used:][::-1])
        if got:  # write the stored blocks through to the host pool
            self.save(blocks[len(host_slots):used], hashes[len(host_slots):used], tokens[len(host_slots):used],
                      to_store=False)
        return blocks[:used]

    def _store_prefix(self, hashes: Sequence[int]) -> int:
        """How many of ``hashes``, from the first, are stored for every stage (0 when it is not worth it)."""
        if self.store is None or not hashes:
            return 0
        n = len(hashes)
        try:
            for layout in self.config.layouts:
                n = self.store.lookup([layout.key(h) for h in hashes[:n]])
                if not n:
                    return 0
        except StoreError as e:
            self.stats.lookup_errors += 1
            logger.debug("store lookup failed: %s", e)
            return 0
        if self.config.cost_rule and not self._worth_loading(n):
            self.stats.loads_skipped += 1
            return 0
        return n

    def _worth_loading(self, num_blocks: int) -> bool:
        if self.store_s_per_block is None or self.prefill_s_per_token is None:
            return True  # nothing measured yet: load, and measure
        return self.store_s_per_block < self.config.block_size * self.prefill_s_per_token

    def _load(self, host_slots: list[int], blocks: list[int], store_hashes: Sequence[int],
              store_tokens: Sequence[tuple[int, ...]]) -> int:
        """Run the load on every rank; returns how many stored blocks every rank loaded."""
        self._load_id += 1
        nh = len(host_slots)
        msg = KvLoadMsg(self._load_id, host_slots, blocks[:nh], [f"{h:032x}" for h in store_hashes],
                        [list(t) for t in store_tokens], blocks[nh:nh + len(store_hashes)])
        start = time.perf_counter()
        replies = self.transport.kv_load(msg)
        elapsed = time.perf_counter() - start
        got = min(r.num_store_loaded for r in replies) if store_hashes else 0
        if store_hashes and got < len(store_hashes):
            logger.warning("%d of %d stored blocks could not be loaded: recomputing them",
                           len(store_hashes) - got, len(store_hashes))
        s = self.stats
        s.host_hit_tokens += nh * self.config.block_size
        s.host_bytes_read += nh * self.config.block_bytes
        s.store_hit_tokens += got * self.config.block_size
        s.store_bytes_read += sum(r.bytes_read for r in replies)
        s.corrupt_blocks += sum(r.num_corrupt for r in replies)
        s.load_s_sum += elapsed
        buckets = list(s.load_s_buckets)
        buckets[bisect.bisect_left(LOAD_BUCKETS, elapsed)] += 1
        s.load_s_buckets = tuple(buckets)
        self._load_s_since_step += elapsed
        if got and not nh:
            per_block = elapsed / got
            old = self.store_s_per_block
            self.store_s_per_block = per_block if old is None else (1 - EWMA) * old + EWMA * per_block
        return got

    # ---- saves ----
    def save(self, blocks: Sequence[int], hashes: Sequence[int], tokens: Sequence[tuple[int, ...]],
             to_store: bool = True) -> None:
        """Write computed full blocks through to the host pool and (``to_store``) the store."""
        slots = [self.host.insert(h, t) for h, t in zip(hashes, tokens)]
        host_slots = [-1 if s is None else s for s in slots]
        store_ok = to_store and self.store is not None and self.store.stats().breaker_state == 0
        if not blocks or (not store_ok and all(s < 0 for s in host_slots)):
            return
        self.stats.host_bytes_written += sum(s >= 0 for s in host_slots) * self.config.block_bytes
        self.transport.kv_save(KvSaveMsg(list(blocks), host_slots, [f"{h:032x}" for h in hashes],
                                         [list(t) for t in tokens], [store_ok] * len(blocks)))

    # ---- measurements ----
    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A finished step (its tokens and time); steps that are mostly prefill set the cost rule's speed."""
        seconds = max(0.0, seconds - self._load_s_since_step)
        self._load_s_since_step = 0.0
        if num_tokens < 2 * self.config.block_size or seconds <= 0:
            return
        per_token = seconds / num_tokens
        old = self.prefill_s_per_token
        self.prefill_s_per_token = per_token if old is None else (1 - EWMA) * old + EWMA * per_token

    def close(self) -> None:
        """Stop the one-process mover's writer thread (stage workers stop with their process)."""
        self.transport.close()

    def snapshot(self) -> dict[str, float | int | list]:
        """Counters for /metrics (plain values: they cross from replica processes as msgpack)."""
        ranks = self.transport.kv_counters()
        store = self.store.stats() if self.store is not None else None
        s = self.stats
        return {
            "host_hit_tokens": s.host_hit_tokens, "store_hit_tokens": s.store_hit_tokens,
            "host_bytes_read": s.host_bytes_read, "host_bytes_written": s.host_bytes_written,
            "store_bytes_read": s.store_bytes_read,
            "store_bytes_written": sum(r.bytes_written for r in ranks),
            "writes_dropped": sum(r.writes_dropped for r in ranks),
            "store_errors": (store.errors if store else 0)
            + (0 if self.transport.kv_shares_coordinator_store else sum(r.store_errors for r in ranks)),
            "corrupt_blocks": s.corrupt_blocks, "loads_skipped": s.loads_skipped,
            "breaker_state": store.breaker_state if store else 0,
            "breaker_opened": store.breaker_opened if store else 0,
            "load_s_sum": s.load_s_sum, "load_s_buckets": list(s.load_s_buckets),
            "host_blocks_used": len(self.host), "host_blocks_total": self.host.num_slots,
        }

