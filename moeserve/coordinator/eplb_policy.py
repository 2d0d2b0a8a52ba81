"""When a layer's experts are worth moving: the predicted gain of a plan, and the back-off of a layer whose
move did not pay. Pure bookkeeping (the rebalancer, ``rebalancer.py``, acts on it)."""

from __future__ import annotations

from dataclasses import dataclass, field


def predicted_gain(balancedness_now: float, balancedness_after: float) -> float:
    """How much faster the layer's heaviest rank gets: ``max_now / max_after - 1`` (the mean load is the
    same, so it is the ratio of the balancednesses). A layer's step is as long as its heaviest rank's, so
    this is the share of the layer's expert time a perfect plan saves: the heaviest rank's wasted share
    ``1 - balancedness`` turned into a speed-up."""
    return balancedness_after / max(balancedness_now, 1e-12) - 1


@dataclass
class Backoff:
    """Per layer, how many checks it sits out. ``judge`` a finished move by its measured balancedness: a
    non-gain (less than ``min_gain`` better than before the move) doubles the layer's wait (1, 2, 4, ...
    checks), a gain clears it."""

    min_gain: float
    misses: dict[int, int] = field(default_factory=dict)  # layer -> measured non-gains in a row
    wait: dict[int, int] = field(default_factory=dict)  # layer -> checks still to sit out

    def judge(self, layer_id: int, before: float, measured_after: float) -> bool:
        """True when the move paid."""
        if measured_after - before >= self.min_gain:
            self.misses[layer_id] = 0
            return True
        self.misses[layer_id] = self.misses.get(layer_id, 0) + 1
        self.wait[layer_id] = 2 ** (self.misses[layer_id] - 1)
        return False

    def sits_out(self, layer_id: int) -> bool:
        """At a check: whether the layer waits this time (counting the check)."""
        if self.wait.get(layer_id, 0) > 0:
            self.wait[layer_id] -= 1
            return True
        return False
