"""Prefix hashing: the hash chain of a sequence's full blocks (a pure function, shared by the cache manager
and the replica router).

Block ``i``'s hash covers every token up to the end of block ``i``: it is the hash of (block ``i - 1``'s hash,
block ``i``'s tokens). Two sequences share the first ``k`` hashes exactly when they share the first
``k * block_size`` tokens (up to hash collisions, which the cache manager rules out by comparing tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

ROOT_HASH = 0x5EED


def block_hashes(token_ids: Sequence[int], block_size: int, start: int = 0,
                 parent: int = ROOT_HASH) -> list[int]:
    """Hashes of the full blocks of ``token_ids`` from block index ``start`` on (``parent``: the hash of
    block ``start - 1``). A trailing partial block has no hash."""
    hashes = []
    num_full = len(token_ids) // block_size
    for i in range(start, num_full):
        # NOTE: hash() of a tuple of ints does not depend on PYTHONHASHSEED, so every process agrees
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes
