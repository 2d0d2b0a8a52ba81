"""Prefix hashing: the hash chain of a sequence's full blocks (a pure function, shared by the cache manager,
the replica router, the host tier and the shared store's keys).

Block ``i``'s hash covers every token up to the end of block ``i``: it is the hash of (block ``i - 1``'s hash,
block ``i``'s tokens). Two sequences share the first ``k`` hashes exactly when they share the first
``k * block_size`` tokens (up to hash collisions, which the cache manager rules out by comparing tokens, and
the store by the token ids in each value's header).

NOTE: the hash is SHA-256 truncated to 128 bits over a fixed byte encoding (little-endian int64 tokens), so
it is the same in every process, on every machine and every Python build: stored blocks are found by other
nodes through it. Python's ``hash()`` is not (it differs across builds and word sizes).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0x5EED


def chain_hash(parent: int, tokens: Sequence[int]) -> int:
    """The hash of one block given its parent's hash: a 128-bit int."""
    h = hashlib.sha256(parent.to_bytes(16, "little"))
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return int.from_bytes(h.digest()[:16], "little")


def block_hashes(token_ids: Sequence[int], block_size: int, start: int = 0,
                 parent: int = ROOT_HASH) -> list[int]:
    """Hashes of the full blocks of ``token_ids`` from block index ``start`` on (``parent``: the hash of
    block ``start - 1``). A trailing partial block has no hash."""
    hashes = []
    num_full = len(token_ids) // block_size
    for i in range(start, num_full):
        parent = chain_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def prompt_tail(token_ids: Sequence[int], block_size: int) -> tuple[int, Sequence[int]] | None:
    """A prompt's tokens past its last full block and short of its last token, with that block's index: what
    a decode instance loads beside the full blocks, so that it computes only the prompt's last token (as a
    decode row: kvstore/disagg.py). None when there are none (the prompt's length minus one is a multiple of
    ``block_size``). The tail's hash is ``chain_hash(<block index - 1>'s hash, tokens)``: fewer tokens than a
    block, so never a full block's hash."""
    n = len(token_ids) - 1
    index, rest = divmod(n, block_size)
    return (index, token_ids[index * block_size:n]) if rest > 0 else None
