"""How the coordinator's ``TierManager`` reaches the ranks' ``BlockMover``s: directly in one process
(``LocalTransport``), or as ``KvSaveMsg`` / ``KvLoadMsg`` through the stage workers' plan socket
(``RankExecutor.kv_save`` / ``kv_load``; a worker answers with ``apply_kv_message``). Messages run in
the order sent, between step plans, so a save always sees the step that computed its blocks."""

from __future__ import annotations

from typing import Protocol

from moeserve.comm.messages import KvLoadedMsg, KvLoadMsg, KvSaveMsg
from moeserve.kvstore.mover import BlockMover


class KvTransport(Protocol):
    # the ranks' movers use the coordinator's own store client (one process): its errors are counted once
    kv_shares_coordinator_store: bool

    def kv_save(self, msg: KvSaveMsg) -> None: ...

    def kv_load(self, msg: KvLoadMsg) -> list[KvLoadedMsg]:
        """Every rank's answer, once each has loaded."""

    def kv_counters(self) -> list[KvLoadedMsg]:
        """The latest store counters of every rank that has reported."""

    def close(self) -> None:
        """Stop what the transport runs in this process (a mover's writer thread)."""


def counters_of(mover: BlockMover, rank: int, load_id: int = 0, loaded: int = 0, nbytes: int = 0,
                corrupt: int = 0) -> KvLoadedMsg:
    c = mover.counters
    stats = mover.store.stats() if mover.store is not None and mover.writes else None
    return KvLoadedMsg(load_id, rank, loaded, nbytes, corrupt, c.writes_dropped, c.blocks_written,
                       stats.bytes_written if stats else 0, stats.errors if stats else 0)


def apply_kv_message(mover: BlockMover, msg: KvSaveMsg | KvLoadMsg, rank: int) -> KvLoadedMsg | None:
    """Run a save or a load on this rank; a load's answer (None for a save)."""
    if isinstance(msg, KvSaveMsg):
        mover.save(msg.blocks, msg.host_slots, [int(h, 16) for h in msg.hashes], msg.tokens, msg.to_store)
        return None
    report = mover.load(msg.host_slots, msg.host_blocks, [int(h, 16) for h in msg.store_hashes],
                        msg.store_tokens, msg.store_blocks)
    return counters_of(mover, rank, msg.load_id, report.num_store_loaded, report.bytes_read, report.num_corrupt)


class LocalTransport:
    """One process: the engine's own runner holds the cache tensors."""

    kv_shares_coordinator_store = True

    def __init__(self, mover: BlockMover):
        self.mover = mover

    def kv_save(self, msg: KvSaveMsg) -> None:
        apply_kv_message(self.mover, msg, 0)

    def kv_load(self, msg: KvLoadMsg) -> list[KvLoadedMsg]:
        reply = apply_kv_message(self.mover, msg, 0)
        assert reply is not None
        return [reply]

    def kv_counters(self) -> list[KvLoadedMsg]:
        return [counters_of(self.mover, 0)]

    def close(self) -> None:
        self.mover.close()
