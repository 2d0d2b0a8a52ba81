"""The ranks' side of the KV connector (kvstore/connector.py), and how the coordinator reaches it.

``KvWorker`` runs on each rank beside its ``BlockMover``: a ``KvSaveMsg`` runs at once (the next step plan
may overwrite the blocks it copies), a ``KvLoadMsg`` goes to a background thread (host-pool slots are
copied at once: a later save may reuse a slot), and each finished load is reported as a ``KvLoadedMsg``
(``poll``). The coordinator reaches the workers through a ``KvTransport`` (``Executor.kv_transport``):
directly in one process (``LocalTransport``), or through the stage workers' plan socket (``RankKvChannel``,
coordinator/rank_kv.py; a worker process sends its reports back on that socket). Messages run in the order
sent, between step plans, so a save always sees the step that computed its blocks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Protocol

from moeserve.comm.messages import KvLoadedMsg, KvLoadMsg, KvSaveMsg
from moeserve.kvstore.layer_ready import LayerReady
from moeserve.kvstore.mover import BlockMover, LoadReport
from moeserve.kvstore.nixl_transfer import NixlAgent
from moeserve.kvstore.remote import pull_remote_blocks

logger = logging.getLogger(__name__)


class KvTransport(Protocol):
    num_ranks: int
    # the ranks' movers use the coordinator's own store client (one process): its errors are counted once
    kv_shares_coordinator_store: bool

    def kv_submit(self, msg: KvSaveMsg | KvLoadMsg) -> None:
        """Send a save or a load to every rank (in order with the step plans)."""

    def kv_poll(self, timeout_s: float = 0.0) -> list[KvLoadedMsg]:
        """The load reports that arrived (waiting up to ``timeout_s`` for the first)."""

    def kv_counters(self) -> list[KvLoadedMsg]:
        """The latest store counters of every rank that has reported."""

    def close(self) -> None:
        """Stop what the transport runs in this process (a mover's writer thread)."""


def counters_of(mover: BlockMover, rank: int, load_id: int = 0, report: LoadReport | None = None,
                load_s: float = 0.0) -> KvLoadedMsg:
    c = mover.counters
    r = report or LoadReport(0, 0, 0)
    stats = mover.store.stats() if mover.store is not None and mover.writes else None
    return KvLoadedMsg(load_id, rank, r.num_store_loaded, r.bytes_read, r.num_corrupt, c.writes_dropped,
                       c.blocks_written, stats.bytes_written if stats else 0, stats.errors if stats else 0,
                       load_s, r.error)


class KvWorker:
    """One rank's loads and saves (see the module docstring)."""

    def __init__(self, mover: BlockMover, rank: int, nixl: NixlAgent | None = None):
        """``nixl``: this rank's NIXL agent, for remote loads by NIXL (a decode instance's)."""
        self.mover = mover
        self.rank = rank
        self.nixl = nixl
        self._loads: queue.Queue[KvLoadMsg | None] = queue.Queue()
        self._done: queue.Queue[KvLoadedMsg] = queue.Queue()
        self.num_pending = 0  # loads not yet reported by ``poll``
        self.ready = LayerReady(mover.layers)  # the layers in of each layer-wise load (steps wait on them)
        self._thread = threading.Thread(target=self._load_loop, name="kv-loader", daemon=True)
        self._thread.start()

    def submit(self, msg: KvSaveMsg | KvLoadMsg) -> None:
        if isinstance(msg, KvSaveMsg):
            if any(slot >= 0 for slot in msg.host_slots) and self.ready.busy():
                self.ready.wait_all()  # NOTE: a layer-wise load may still read a host slot this save reuses
            self.mover.save(msg.blocks, msg.host_slots, [int(h, 16) for h in msg.hashes], msg.tokens, msg.to_store)
        elif msg.load_id == 0:  # a counters request: answered at once
            self._done.put(counters_of(self.mover, self.rank))
        else:
            if msg.layerwise:
                self.ready.start(msg.load_id)  # before the step plan that waits for it arrives
            if not msg.layerwise or self.mover.pin:
                self.mover.load_host(msg.host_slots, msg.host_blocks)
            self.num_pending += 1
            self._loads.put(msg)

    def _load_loop(self) -> None:
        while True:
            msg = self._loads.get()
            if msg is None:
                return
            start = time.perf_counter()
            if msg.layerwise:
                self._load_layerwise(msg, start)
                continue
            if msg.remote_addr:
                report = pull_remote_blocks(self.mover, msg, self.nixl)
            else:
                report = self.mover.load_store([int(h, 16) for h in msg.store_hashes], msg.store_tokens,
                                               msg.store_blocks)
            self._done.put(counters_of(self.mover, self.rank, msg.load_id, report, time.perf_counter() - start))

    def _load_layerwise(self, msg: KvLoadMsg, start: float) -> None:
        """A layer-wise load: each layer is announced to the steps waiting for it as it lands; the report goes
        out before the waiters are released for good (also when the load failed)."""
        load_id = msg.load_id
        try:
            report = self.mover.load_layerwise(
                [] if self.mover.pin else msg.host_slots, msg.host_blocks, [int(h, 16) for h in msg.store_hashes],
                msg.store_tokens, msg.store_blocks, lambda n: self.ready.mark(load_id, n))
            self._done.put(counters_of(self.mover, self.rank, load_id, report, time.perf_counter() - start))
        except Exception as e:  # noqa: BLE001 - nothing of the store part counts; the coordinator recomputes it
            logger.exception("layer-wise load %d failed", load_id)
            self._done.put(counters_of(self.mover, self.rank, load_id, LoadReport(0, 0, 0, f"layer-wise load: {e}"),
                                       time.perf_counter() - start))
        finally:
            self.ready.finish(load_id)

    def poll(self, timeout_s: float = 0.0) -> list[KvLoadedMsg]:
        out: list[KvLoadedMsg] = []
        try:
            out.append(self._done.get(timeout=timeout_s) if timeout_s > 0 else self._done.get_nowait())
            while True:
                out.append(self._done.get_nowait())
        except queue.Empty:
            self.num_pending -= sum(1 for r in out if r.load_id)
            return out

    def close(self) -> None:
        self._loads.put(None)
        self._thread.join(timeout=10)
        if self.nixl is not None:
            self.nixl.close()
        self.mover.close()


class LocalTransport:
    """One process: the engine's own runner holds the cache tensors."""

    num_ranks = 1
    kv_shares_coordinator_store = True

    def __init__(self, mover: BlockMover, nixl: NixlAgent | None = None):
        self.mover = mover
        self.worker = KvWorker(mover, 0, nixl)

    def kv_submit(self, msg: KvSaveMsg | KvLoadMsg) -> None:
        self.worker.submit(msg)

    def kv_poll(self, timeout_s: float = 0.0) -> list[KvLoadedMsg]:
        return self.worker.poll(timeout_s)

    def kv_counters(self) -> list[KvLoadedMsg]:
        return [counters_of(self.mover, 0)]

    def close(self) -> None:
        self.worker.close()
