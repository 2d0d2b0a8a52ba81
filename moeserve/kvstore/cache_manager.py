"""KVCacheManager: the scheduler's only view of the latent cache.

The scheduler asks to ``allocate_slots`` for a request's next tokens, and ``free``s a request; it gets back
an opaque ``BlockTable`` per request and never sees the pool. Every layer (and every pipeline stage) uses the
same block ids for a sequence, so one table addresses the whole cache.

Automatic prefix caching: at admission ``match_prefix`` gives a request the cached blocks of its longest
cached prefix (whole blocks, never the last token: something must be computed to sample from), and after
each step ``cache_full_blocks`` registers the request's newly computed full blocks for later requests.

With ``tiers`` (kvstore/tiers.py) a device match is extended from the host pool and the shared store, and
newly computed full blocks are written through to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moeserve.kvstore.block_pool import BlockPool
from moeserve.kvstore.prefix import ROOT_HASH, block_hashes

if TYPE_CHECKING:
    from moeserve.kvstore.tiers import TierManager


@dataclass(frozen=True)
class BlockTable:
    """The physical blocks of one request, in order. Opaque to the scheduler."""

    block_ids: tuple[int, ...]


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 tiers: TierManager | None = None):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self._views: dict[str, BlockTable] = {}  # the last table handed out, while it is unchanged
        self._hashes: dict[str, list[int]] = {}  # request -> prefix hashes of its registered full blocks
        self.num_prefix_query_tokens = 0  # prompt tokens looked up at admission, cumulative
        self.num_prefix_hit_tokens = 0  # of which were found in the device cache
        self.tiers = tiers if enable_prefix_caching else None

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def match_prefix(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Give a request with no blocks yet the cached blocks of its longest cached prefix; returns how many
        tokens they hold (a multiple of block_size, at most len(token_ids) - 1)."""
        assert request_id not in self._tables, f"request {request_id!r} already holds blocks"
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs  # NOTE: the last token is always recomputed
        blocks, hashes = [], []
        all_hashes = block_hashes(token_ids[:max_blocks * bs], bs)
        for i, h in enumerate(all_hashes):
            block = self.pool.lookup(h, tuple(token_ids[i * bs:(i + 1) * bs]))
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
        for b in blocks:
            self.pool.touch(b)
        self.num_prefix_hit_tokens += len(blocks) * bs
        if self.tiers is not None and len(blocks) < max_blocks:
            self._extend_from_tiers(token_ids, blocks, hashes, all_hashes)
        if blocks:
            self._tables[request_id] = blocks
            self._hashes[request_id] = hashes
        self.num_prefix_query_tokens += len(token_ids)
        return len(blocks) * bs

    def _extend_from_tiers(self, token_ids: Sequence[int], blocks: list[int], hashes: list[int],
                           all_hashes: list[int]) -> None:
        """Append to a device match the blocks that the host pool and the store can fill (now computed)."""
        assert self.tiers is not None
        bs, start = self.block_size, len(blocks)
        rest = all_hashes[start:]
        tokens = [tuple(token_ids[i * bs:(i + 1) * bs]) for i in range(start, len(all_hashes))]
        loaded = self.tiers.load_prefix(rest, tokens, self.pool)
        for block, h, t in zip(loaded, rest, tokens):
            self.pool.register(block, h, t)
        blocks.extend(loaded)
        hashes.extend(rest[:len(loaded)])

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the request's full blocks whose latents are now computed."""
        if not self.enable_prefix_caching or request_id not in self._tables:
            return
        done = self._hashes.setdefault(request_id, [])
        table = self._tables[request_id]
        num_full = min(num_computed_tokens // self.block_size, len(table))
        if num_full <= len(done):
            return
        parent = done[-1] if done else ROOT_HASH
        new = block_hashes(token_ids[:num_full * self.block_size], self.block_size, start=len(done), parent=parent)
        tokens = [tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
                  for i in range(len(done), num_full)]
        for i, (h, t) in enumerate(zip(new, tokens), start=len(done)):
            self.pool.register(table[i], h, t)
        if self.tiers is not None:
            self.tiers.save(table[len(done):num_full], new, tokens)
        done.extend(new)

    def allocate_slots(self, request_id: str, num_total_tokens: int) -> BlockTable | None:
        """Make room for ``num_total_tokens`` tokens of this request in the cache.

        Returns the request's table, or None (and allocates nothing) when too few blocks are free.
        """
        table = self._tables.setdefault(request_id, [])
        missing = -(-num_total_tokens // self.block_size) - len(table)
        if missing <= 0:
            view = self._views.get(request_id)
            if view is not None:  # NOTE: most decode steps: no new block, no new tuple
                return view
        elif missing > self.pool.num_free:
            if not table:
                del self._tables[request_id]
            return None
        else:
            table.extend(self.pool.allocate(missing))
        view = self._views[request_id] = BlockTable(tuple(table))
        return view

    def table(self, request_id: str) -> BlockTable:
        return BlockTable(tuple(self._tables.get(request_id, ())))

    def free(self, request_id: str) -> None:
        """Release every block of the request (idempotent). Its cached blocks stay reusable until evicted;
        the tail goes first (freed in reverse, so it is reused before the shared head)."""
        blocks = self._tables.pop(request_id, None)
        self._views.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if blocks:
            self.pool.free(blocks[::-1])

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables
