"""Layer-wise loading on a rank: which layers of a load have landed in the cache (LMCache's layer-wise mode).

A layer-wise load (``KvLoadMsg.layerwise``) is registered here when the rank receives it, before any step
plan that reads its blocks. The loader thread fills the blocks layer by layer, in the rank's layer order, and
``mark``s each layer as it lands; a step whose plan lists the load (``StepPlan.wait_loads``) waits in
``wait`` before each layer runs, only until that layer of the load is in. ``finish`` (in a ``finally``:
also when the load failed) releases every waiter: a step computed over a failed load is then dropped by the
coordinator, which learns how many blocks arrived from the load's report.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence


class LayerReady:
    def __init__(self, layer_ids: Sequence[int]):
        """``layer_ids``: this rank's cache layers, in the order a load fills them."""
        self.index = {layer_id: j for j, layer_id in enumerate(layer_ids)}
        self.num_layers = len(layer_ids)
        self._cond = threading.Condition()
        self._landed: dict[int, int] = {}  # load id -> layers in, from the first (loads still running)

    def start(self, load_id: int) -> None:
        with self._cond:
            self._landed[load_id] = 0

    def mark(self, load_id: int, num_layers: int) -> None:
        """The first ``num_layers`` layers of the load are in the cache."""
        with self._cond:
            if self._landed.get(load_id, num_layers) < num_layers:
                self._landed[load_id] = num_layers
                self._cond.notify_all()

    def finish(self, load_id: int) -> None:
        """The load is over (done or failed): nothing waits for it any more."""
        with self._cond:
            self._landed.pop(load_id, None)
            self._cond.notify_all()

    def wait(self, load_ids: Sequence[int], layer_id: int) -> None:
        """Block until layer ``layer_id`` of every load in ``load_ids`` is in (or the load is over)."""
        j = self.index.get(layer_id)
        if j is None:
            return  # not a cache layer of this rank
        with self._cond:
            self._cond.wait_for(lambda: all(self._landed.get(i, self.num_layers) > j for i in load_ids))

    def busy(self) -> bool:
        with self._cond:
            return bool(self._landed)

    def wait_all(self) -> None:
        """Block until no load is running (a save may reuse the host slots a load reads)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._landed)
