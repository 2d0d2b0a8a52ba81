"""The KV transport (``kvstore/transport.py``) of the executors whose ranks are worker processes
(``RankExecutor``): saves and loads go to every rank through the step channel, in order with the step plans;
the ranks' ``KvWorker``s answer ``KvLoadedMsg`` on the same socket, which the executor reads and hands to
``receive``."""

from __future__ import annotations

import time
from collections.abc import Callable

from moeserve.comm.messages import KvLoadedMsg, KvLoadMsg, KvSaveMsg, encode


class RankKvChannel:
    """One owner for what the ranks report about the KV store: finished loads until ``kv_poll``, each rank's
    latest counters, and a prefill instance's stage block servers."""

    kv_shares_coordinator_store = False  # each rank has its own store client

    def __init__(self, num_ranks: int, send: Callable[[bytes], None], read_arrived: Callable[[float], None]):
        """``send``: a frame to every rank; ``read_arrived(timeout_s)``: the executor reads what has arrived
        (handing KV reports to ``receive``), waiting up to ``timeout_s`` for the first message."""
        self.num_ranks = num_ranks
        self._send = send
        self._read_arrived = read_arrived
        self._counters: dict[int, KvLoadedMsg] = {}  # rank -> its latest KV store counters
        self._reports: list[KvLoadedMsg] = []  # finished loads, until kv_poll
        self._polled = 0.0
        # a prefill instance's stage block servers: (address, first layer, number of layers)
        self.block_servers: list[tuple[str, int, int]] = []

    def receive(self, msg: KvLoadedMsg) -> None:
        """A rank's finished load (or only its counters: load id 0)."""
        self._counters[msg.rank] = msg
        if msg.load_id:
            self._reports.append(msg)

    def clear(self) -> None:
        """Forget what the ranks reported (a restart starts new ones)."""
        self._counters.clear()
        self._reports.clear()
        self.block_servers.clear()

    def kv_submit(self, msg: KvSaveMsg | KvLoadMsg) -> None:
        """Send a KV save or load to every rank, in order with the step plans."""
        self._send(encode(msg))

    def kv_poll(self, timeout_s: float = 0.0) -> list[KvLoadedMsg]:
        """The ranks' load reports that arrived (waiting up to ``timeout_s`` for one)."""
        self._read_arrived(0.0 if self._reports else timeout_s)
        reports, self._reports = self._reports, []
        return reports

    def kv_counters(self) -> list[KvLoadedMsg]:
        """Every rank's latest store counters. Every 2 s this asks again without waiting (an empty load, id 0):
        the answers are picked up while collecting logits."""
        now = time.monotonic()
        if now - self._polled > 2.0:
            self._polled = now
            self._send(encode(KvLoadMsg(0, [], [], [], [], [])))
        return list(self._counters.values())

    def close(self) -> None:
        """The ranks' movers stop with the ranks (``RankExecutor.shutdown``)."""
