"""A fixed pool of physical cache blocks with a free list, reference counts and a prefix-hash index.

A full block whose latents are computed can be registered under its prefix hash (``kvstore/prefix.py``).
When its last reference goes it stays cached on the free list: a later request with the same prefix takes it
back (``touch``) instead of recomputing it, until the block is handed out again for new tokens, which evicts
it. The free list is LRU: blocks freed longest ago are reused (and evicted) first.
"""

from __future__ import annotations

from collections import OrderedDict


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"the cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = reused first
        self._ref_counts = [0] * num_blocks
        self._cached: dict[int, int] = {}  # prefix hash -> block
        self._block_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (prefix hash, its tokens)

    @property
    def num_free(self) -> int:
        """Blocks with no reference (cached ones included: they are reused when needed)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise NoFreeBlocksError(f"asked for {count} blocks, {len(self._free)} free")
        blocks = [self._free.popitem(last=False)[0] for _ in range(count)]
        for b in blocks:
            assert self._ref_counts[b] == 0, f"block {b} on the free list has references"
            self._ref_counts[b] = 1
            self._evict(b)
        return blocks

    def _evict(self, block: int) -> None:
        key = self._block_key.pop(block, None)
        if key is not None and self._cached.get(key[0]) == block:
            del self._cached[key[0]]

    def share(self, blocks: list[int]) -> None:
        """Add a reference to blocks already in use (a shared prefix)."""
        for b in blocks:
            assert self._ref_counts[b] > 0, f"cannot share free block {b}"
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks that reach zero return to the free list (at its end)."""
        for b in blocks:
            assert self._ref_counts[b] > 0, f"double free of block {b}"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free[b] = None

    # ---- the prefix cache ----
    def lookup(self, prefix_hash: int, tokens: tuple[int, ...]) -> int | None:
        """The cached block for this prefix hash, if its tokens match (so a hash collision is a miss)."""
        block = self._cached.get(prefix_hash)
        if block is None or self._block_key[block][1] != tokens:
            return None
        return block

    def touch(self, block: int) -> None:
        """Take a reference to a cached block, in use or on the free list."""
        if self._ref_counts[block] == 0:
            del self._free[block]
        self._ref_counts[block] += 1

    def register(self, block: int, prefix_hash: int, tokens: tuple[int, ...]) -> None:
        """Cache a full, computed block under its prefix hash (the first block for a hash wins)."""
        assert self._ref_counts[block] > 0, f"cannot register free block {block}"
        if prefix_hash not in self._cached and block not in self._block_key:
            self._cached[prefix_hash] = block
            self._block_key[block] = (prefix_hash, tokens)
