"""The KV transport of the executors whose ranks are processes (coordinator/rank_kv.py), without processes:
what it sends, the reports it keeps until ``kv_poll``, each rank's latest counters, and ``clear``."""

from __future__ import annotations

from moeserve.comm.messages import KvLoadedMsg, KvLoadMsg, decode
from moeserve.coordinator.rank_kv import RankKvChannel


def loaded(load_id: int, rank: int) -> KvLoadedMsg:
    return KvLoadedMsg(load_id, rank, 0, 0, 0, 0, 0, 0, 0)


def test_reports_wait_for_kv_poll_and_counters_keep_the_latest() -> None:
    sent: list[bytes] = []
    waits: list[float] = []
    channel = RankKvChannel(2, sent.append, waits.append)
    assert channel.kv_poll(0.5) == [] and waits == [0.5]  # nothing kept: it waits for the ranks
    channel.receive(loaded(0, 0))  # counters only
    channel.receive(loaded(7, 1))
    channel.receive(loaded(7, 0))
    assert channel.kv_poll(0.5) == [loaded(7, 1), loaded(7, 0)] and waits[-1] == 0.0  # reports kept: no wait
    assert channel.kv_poll() == []
    assert channel.kv_counters() == [loaded(7, 0), loaded(7, 1)]
    assert isinstance(decode(sent[-1]), KvLoadMsg) and decode(sent[-1]).load_id == 0  # asks for fresh counters
    channel.kv_counters()
    assert len(sent) == 1  # not again within 2 s
    channel.block_servers.append(("tcp://a:1", 0, 4))
    channel.clear()
    assert channel.kv_counters() == [] and channel.block_servers == [] and channel.kv_poll() == []
