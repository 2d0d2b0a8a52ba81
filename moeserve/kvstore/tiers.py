"""TierManager: the coordinator's view of the tiers below the device cache -- the host pool and the shared
store -- and every decision about them (the ranks' ``BlockMover``s only copy what they are told).

A ``KVConnector`` (kvstore/connector.py). At admission the cache manager matches the device cache first;
``plan_load`` then extends the match from the host pool (``HostIndex``: chain hash -> slot, LRU), then from
the store (the longest prefix stored for every pipeline stage); ``begin_load`` has every rank load those
blocks into the device blocks the cache manager allocated, and ``finished_loads`` says how many arrived.
``save`` writes newly computed full blocks through to the host pool and (through the ranks' bounded queues)
to the store; loads and saves reach the ranks with the next step (``send_ops``). A cost rule skips store loads that are estimated to take
longer than recomputing the same tokens (measured load time per block against measured prefill time per token).
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from moeserve.comm.messages import KvLoadMsg, KvSaveMsg
from moeserve.kvstore.block_format import BlockLayout
from moeserve.kvstore.connector import LoadDone, LoadPlan, PendingLoad, QueuedConnector
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
    layerwise: bool = True  # loads may be layer-wise (kvstore/layer_ready.py)

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
    layerwise_loads: int = 0  # loads the request did not wait for (kvstore/layer_ready.py)
    lookup_errors: int = 0
    corrupt_blocks: int = 0
    load_s_sum: float = 0.0
    load_s_buckets: tuple[int, ...] = (0,) * (len(LOAD_BUCKETS) + 1)


@dataclass(frozen=True)
class TierLoadPlan:
    """The blocks the host pool holds (its slots), then those the store holds, from the first."""

    hashes: tuple[int, ...]
    tokens: tuple[tuple[int, ...], ...]
    host_slots: tuple[int, ...]
    layerwise: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)


@dataclass
class _TierLoad:
    plan: TierLoadPlan
    blocks: list[int]


class TierManager(QueuedConnector):
    """The host tier and the shared store as a ``KVConnector`` (kvstore/connector.py)."""

    def __init__(self, config: TierConfig, transport: KvTransport, store: KVStore | None):
        """``store``: the coordinator's client (lookups)."""
        super().__init__(transport.num_ranks, transport)
        self.config = config
        self.store = store
        self.host = HostIndex(config.host_blocks)
        self.stats = TierStats()
        self.store_s_per_block: float | None = None  # measured: one stored block into the device, all ranks
        self.prefill_s_per_token: float | None = None  # measured from steps that were mostly prefill

    # ---- loads ----
    def plan_load(self, hashes: Sequence[int], tokens: Sequence[tuple[int, ...]],
                  kv_transfer: str | None = None) -> TierLoadPlan | None:
        host_slots: list[int] = []
        for h, t in zip(hashes, tokens):
            slot = self.host.lookup(h, t)
            if slot is None:
                break
            host_slots.append(slot)
        n = len(host_slots) + self._store_prefix(hashes[len(host_slots):])
        if n == 0:
            return None
        return TierLoadPlan(tuple(hashes[:n]), tuple(tokens[:n]), tuple(host_slots), self.config.layerwise)

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

    def begin_load(self, request_id: str, plan: LoadPlan, blocks: Sequence[int], layerwise: bool = False) -> int:
        assert isinstance(plan, TierLoadPlan) and len(blocks) <= plan.num_blocks
        assert plan.layerwise or not layerwise
        self.stats.layerwise_loads += int(layerwise)
        n, nh = len(blocks), min(len(blocks), len(plan.host_slots))
        return self._queue_load(lambda load_id: KvLoadMsg(
            load_id, list(plan.host_slots[:nh]), list(blocks[:nh]), [f"{h:032x}" for h in plan.hashes[nh:n]],
            [list(t) for t in plan.tokens[nh:n]], list(blocks[nh:n]), layerwise=layerwise), request_id,
            _TierLoad(plan, list(blocks)))

    def _finish(self, pending: PendingLoad, state: object) -> LoadDone:
        """Count a load every rank has done; write its stored blocks through to the host pool."""
        load = state
        assert isinstance(load, _TierLoad)
        nh = min(len(load.blocks), len(load.plan.host_slots))
        num_store = len(load.blocks) - nh
        got = min(pending.num_loaded, num_store)
        if got < num_store:
            logger.warning("%d of %d stored blocks could not be loaded: recomputing them", num_store - got,
                           num_store)
        replies, elapsed = pending.replies.values(), pending.seconds
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
        if got and not nh:
            per_block = elapsed / got
            old = self.store_s_per_block
            self.store_s_per_block = per_block if old is None else (1 - EWMA) * old + EWMA * per_block
        if got:  # write the stored blocks through to the host pool
            self.save(load.blocks[nh:nh + got], load.plan.hashes[nh:nh + got], load.plan.tokens[nh:nh + got],
                      to_store=False)
        return LoadDone(pending.request_id, nh + got)

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
        hex_hashes, token_lists = [f"{h:032x}" for h in hashes], [list(t) for t in tokens]
        last = self._ops[-1] if self._ops else None
        # NOTE: the saves of one step (a request's block filled: at batch 256 and 16-token blocks, 16 a step)
        # travel as one message and one gather on the ranks; not where a slot repeats, as the copies into one
        # slot would then land in no set order. Saves with store writes merge too (a full write queue drops
        # blocks, not whole messages): one message per save cost a block-fill step 16 gathers and 260 launches
        # (1.5 ms of device time, the nineteenth session's probe).
        if isinstance(last, KvSaveMsg) and {s for s in host_slots if s >= 0}.isdisjoint(last.host_slots):
            last.blocks += blocks
            last.host_slots += host_slots
            last.hashes += hex_hashes
            last.tokens += token_lists
            last.to_store += [store_ok] * len(blocks)
        else:
            self._ops.append(KvSaveMsg(list(blocks), host_slots, hex_hashes, token_lists, [store_ok] * len(blocks)))

    # ---- measurements ----
    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A finished step (its tokens and time); steps that are mostly prefill set the cost rule's speed."""
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

