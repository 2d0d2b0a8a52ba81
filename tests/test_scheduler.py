"""Block pool, cache manager and scheduler as pure units (no model)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.coordinator.request import Request
from moeserve.coordinator.sampling import SamplingParams
from moeserve.coordinator.scheduler import Scheduler, SchedulerConfig
from moeserve.kvstore.block_pool import BlockPool, NoFreeBlocksError
from moeserve.kvstore.cache_manager import KVCacheManager


def test_block_pool_ref_counts() -> None:
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1
    pool.share(a[:1])
    pool.free(a)
    assert pool.num_free == 3  # a[0] still has one reference
    pool.free(a[:1])
    assert pool.num_free == 4
    with pytest.raises(AssertionError, match="double free"):
        pool.free(a[:1])
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(5)


def test_cache_manager_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots("a", 9).block_ids == (0, 1, 2)
    assert kv.allocate_slots("b", 8) is None and not kv.holds("b")
    assert kv.num_free_blocks == 1
    assert kv.allocate_slots("a", 12).block_ids == (0, 1, 2)
    kv.free("a")
    kv.free("a")
    assert kv.num_free_blocks == 4


def _req(rid: str, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0.0))


def _run_step(sched: Scheduler) -> list[tuple[str, int]]:
    """One step: schedule, mark computed, and 'sample' one token for every request that completed."""
    out = sched.schedule()
    done = [s.request for s in out.scheduled if s.completes_sequence]
    sched.advance(out)
    for r in done:
        r.token_ids.append(0)
        if r.num_output_tokens >= r.params.max_tokens:
            sched.remove(r)
            r.status = r.status.FINISHED
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def test_chunked_prefill_and_decode_first() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), KVCacheManager(64, 4))
    sched.add(_req("long", 25))
    assert _run_step(sched) == [("long", 10)]
    sched.add(_req("short", 3))
    assert _run_step(sched) == [("long", 10)]
    assert _run_step(sched) == [("long", 5), ("short", 3)]
    step = _run_step(sched)
    assert step[0][1] == 1 and step[1][1] == 1  # both decoding now


def test_preempts_newest_when_full_and_recomputes() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)  # 24 tokens
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), kv)
    old, new = _req("old", 10, max_tokens=10), _req("new", 10, max_tokens=10)
    sched.add(old)
    sched.add(new)
    preempted = 0
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out_before = len(sched.waiting)
        _run_step(sched)
        preempted += max(0, len(sched.waiting) - out_before)
    assert not sched.has_unfinished()
    assert old.num_output_tokens == 10 and new.num_output_tokens == 10
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    assert kv.num_free_blocks == 6


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=12),
       st.integers(8, 40), st.integers(1, 6), st.integers(2, 8))
def test_never_deadlocks_and_frees_everything(reqs: list[tuple[int, int]], num_blocks: int, block_size: int,
                                              budget: int) -> None:
    kv = KVCacheManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget), kv)
    requests = [_req(str(i), p, m) for i, (p, m) in enumerate(reqs) if p + m <= kv.capacity_tokens]
    for r in requests:
        sched.add(r)
    for _ in range(20_000):
        if not sched.has_unfinished():
            break
        assert _run_step(sched), "a step with unfinished requests scheduled nothing"
    assert not sched.has_unfinished()
    assert all(r.num_output_tokens == r.params.max_tokens for r in requests)
    assert kv.num_free_blocks == num_blocks
