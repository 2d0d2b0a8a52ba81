"""KVCacheManager: the scheduler's only view of the latent cache.

The scheduler asks to ``allocate_slots`` for a request's next tokens, and ``free``s a request; it gets back
an opaque ``BlockTable`` per request and never sees the pool. Every layer (and every pipeline stage) uses the
same block ids for a sequence, so one table addresses the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.kvstore.block_pool import BlockPool


@dataclass(frozen=True)
class BlockTable:
    """The physical blocks of one request, in order. Opaque to the scheduler."""

    block_ids: tuple[int, ...]


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def allocate_slots(self, request_id: str, num_total_tokens: int) -> BlockTable | None:
        """Make room for ``num_total_tokens`` tokens of this request in the cache.

        Returns the request's table, or None (and allocates nothing) when too few blocks are free.
        """
        table = self._tables.setdefault(request_id, [])
        missing = blocks_needed(num_total_tokens, self.block_size) - len(table)
        if missing > self.pool.num_free:
            if not table:
                del self._tables[request_id]
            return None
        if missing > 0:
            table.extend(self.pool.allocate(missing))
        return BlockTable(tuple(table))

    def table(self, request_id: str) -> BlockTable:
        return BlockTable(tuple(self._tables.get(request_id, ())))

    def free(self, request_id: str) -> None:
        """Release every block of the request (idempotent)."""
        blocks = self._tables.pop(request_id, None)
        if blocks:
            self.pool.free(blocks)

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables
