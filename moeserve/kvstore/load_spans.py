"""How a store load is cut among the store's servers and the reading threads (kvstore/store_load.py), and how a
layer-wise load's groups of layers are announced once every thread has passed them. Plain lists of positions:
no I/O here."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from itertools import zip_longest


def homes(store: object, keys: Sequence[str]) -> list[list[int]]:
    """The positions of ``keys`` by store server (kvstore/sharded_store.py: a store with ``shard_of``; else one),
    each server's in order."""
    shard_of = getattr(store, "shard_of", None)
    out: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(shard_of(key) if shard_of is not None else 0, []).append(i)
    return list(out.values())


def chunk_spans(by_home: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """The positions in chunks of up to ``size``, each chunk's keys on one store server (a chunk then costs one
    round trip, not one per server it touches), the servers' chunks taken in turn so that the reading threads ask
    different servers at once."""
    per_home = [[list(g[lo:lo + size]) for lo in range(0, len(g), size)] for g in by_home]
    return [span for turn in zip_longest(*per_home) for span in turn if span is not None]


def thread_spans(by_home: Sequence[Sequence[int]], num_threads: int) -> list[list[int]]:
    """The positions in at most ``num_threads`` spans, one a reading thread, each on one server where there are as
    many threads as servers or more (a layer-wise load: every span runs at once, from its first group of layers
    to its last)."""
    if not by_home:
        return []
    k = num_threads
    if len(by_home) >= k:  # several servers a thread: a round trip to each, in turn
        return [sorted(i for g in by_home[t::k] for i in g) for t in range(k)]
    per = k // len(by_home)
    return [list(g[lo:lo + -(-len(g) // per)]) for g in by_home for lo in range(0, len(g), -(-len(g) // per))]


class GroupsPassed:
    """How many spans of a layer-wise load have yet to pass each group of layers; ``on_layer(end of the group)``
    once none has. A span passes its groups in order, so the groups are announced in order."""

    def __init__(self, num_spans: int, ends: Sequence[int], on_layer: Callable[[int], None]):
        self._left = [num_spans] * len(ends)
        self._ends = list(ends)
        self._on_layer = on_layer
        self._lock = threading.Lock()

    def add(self, group: int) -> None:
        with self._lock:
            self._left[group] -= 1
            if self._left[group] == 0:
                self._on_layer(self._ends[group])
