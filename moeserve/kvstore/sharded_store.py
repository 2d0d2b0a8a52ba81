"""``ShardedStore``: keys spread over several store servers by a hash of the key (``--kv-store URL,URL,...``).

One redis-server answers every connection on one thread, and that thread is where a load's rate tops out (about
2.8 GB/s on a 16-core host, BENCHMARKS.md issue 21); several servers, on one host or several, each answer their
share. Every key has one home (xxh64 of the key, modulo the number of servers), so every engine given the same
list, in the same order, finds the same blocks.

A server that fails costs only its own keys: they read as missing (the prefix ends at the first of them and the
rest is recomputed), while the other servers' keys still load. Each server keeps its own timeout and circuit
breaker (kvstore/store.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import xxhash

from moeserve.kvstore.store import KVStore, StoreError, StoreStats

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ShardedStore:
    def __init__(self, shards: Sequence[KVStore]):
        if len(shards) < 2:
            raise ValueError("a sharded store needs two servers or more")
        self.shards = list(shards)

    def shard_of(self, key: str) -> int:
        return xxhash.xxh64_intdigest(key.encode()) % len(self.shards)

    def _split(self, keys: Sequence[str]) -> dict[int, list[int]]:
        """Shard -> the positions in ``keys`` of its keys, in order."""
        out: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            out.setdefault(self.shard_of(key), []).append(i)
        return out

    def _each(self, keys: Sequence[str], call: Callable[[KVStore, list[int]], list[T]], missing: T) -> list[T]:
        """``call(shard, positions)`` for each shard's keys, its answers put back in the order of ``keys``; a shard
        that fails answers ``missing`` for its keys."""
        out: list[T] = [missing] * len(keys)
        for s, positions in self._split(keys).items():
            try:
                answers = call(self.shards[s], positions)
            except StoreError as e:
                logger.debug("store shard %d: %s", s, e)
                continue
            for i, answer in zip(positions, answers):
                out[i] = answer
        return out

    def lookup(self, keys: Sequence[str]) -> int:
        first_missing = len(keys)
        for s, positions in self._split(keys).items():
            try:
                n = self.shards[s].lookup([keys[i] for i in positions])
            except StoreError as e:
                logger.debug("store shard %d: %s", s, e)
                n = 0
            if n < len(positions):
                first_missing = min(first_missing, positions[n])
        return first_missing

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._each(keys, lambda shard, pos: shard.get([keys[i] for i in pos]), None)

    def put(self, items: Sequence[tuple[str, bytes | memoryview]]) -> None:
        failed: list[str] = []
        for s, positions in self._split([key for key, _ in items]).items():
            try:
                self.shards[s].put([items[i] for i in positions])
            except StoreError as e:
                failed.append(f"shard {s}: {e}")
        if failed:
            raise StoreError("; ".join(failed))

    def read_into(self, keys: Sequence[str], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        return self._each(keys, lambda shard, pos: shard.read_into([keys[i] for i in pos], [dests[i] for i in pos]),
                          -1)

    def read_ranges_into(self, ranges: Sequence[tuple[str, int]], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        return self._each([key for key, _ in ranges], lambda shard, pos: shard.read_ranges_into(
            [ranges[i] for i in pos], [dests[i] for i in pos]), 0)

    def stats(self) -> StoreStats:
        """Sums over the servers; the breaker's state is the best server's (the store takes writes while any
        server does: a server down shows in ``errors`` and ``breaker_opened``)."""
        parts = [shard.stats() for shard in self.shards]
        return StoreStats(sum(p.bytes_read for p in parts), sum(p.bytes_written for p in parts),
                          sum(p.errors for p in parts), min(p.breaker_state for p in parts),
                          sum(p.breaker_opened for p in parts))
