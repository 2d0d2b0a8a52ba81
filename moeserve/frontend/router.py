"""Replica routing by prefix affinity and load (pure functions and a small index; no processes).

The front end keeps, per replica, an approximate index of the prompt-prefix block hashes it has routed there
(bounded LRU: the replica may have evicted some). A request goes to the replica whose index matches the
longest prefix of its prompt, unless the load is out of balance, in which case it goes to the least loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

POLICIES = ("affinity", "load", "round_robin")


class PrefixIndex:
    """Block hashes recently routed to one replica (LRU, at most ``capacity`` entries)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hashes)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading ``hashes`` are held."""
        n = 0
        for h in hashes:
            if h not in self._hashes:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.capacity:
            self._hashes.popitem(last=False)


def choose_replica(matched_blocks: Sequence[int], loads: Sequence[int], policy: str = "affinity",
                   counter: int = 0, balance_abs_tokens: int = 4096, balance_rel: float = 1.5) -> int:
    """Pick a replica. ``matched_blocks[r]``: prefix blocks replica r likely holds; ``loads[r]``: its
    outstanding tokens. ``affinity``: the longest match (ties: the least loaded) unless the loads are out of
    balance (max - min > balance_abs_tokens and max > balance_rel * min), then the least loaded; ``load``:
    the least loaded (ties rotate with ``counter``); ``round_robin``: ``counter`` mod the number of replicas."""
    n = len(loads)
    if policy not in POLICIES:
        raise ValueError(f"routing policy must be one of {POLICIES}, got {policy!r}")
    if policy == "round_robin":
        return counter % n
    least = min(range(n), key=lambda r: (loads[r], (r - counter) % n))  # ties rotate: new prefixes spread
    if policy == "load":
        return least
    hi, lo = max(loads), min(loads)
    if hi - lo > balance_abs_tokens and hi > balance_rel * lo:
        return least
    best = max(range(n), key=lambda r: (matched_blocks[r], -loads[r], -r))
    return best if matched_blocks[best] > 0 else least
