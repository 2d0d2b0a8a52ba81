"""The engine over stage worker processes (gloo on CPU): every layout gives the tokens of one process.

Real processes, a real torch.distributed world, real ZeroMQ sockets and msgpack step plans.
"""

from __future__ import annotations

import json

import pytest
import test_engine  # noqa: E402  (tests/ is on sys.path via conftest)

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.executor import WorkerError
from moeserve.coordinator.sampling import SamplingParams

VARIANT = "v3_noshared"  # 4 layers: room for pp = 4


def run(ckpt, **parallel) -> list[list[int]]:
    engine = Engine(EngineConfig(model=str(ckpt), block_size=4, kv_cache_memory=1 << 22, max_num_seqs=8,
                                 max_num_batched_tokens=32, **parallel))
    try:
        if engine.parallel_plan is not None:  # each rank loaded exactly the share the plan gives it
            planned = {r: w.total for r, w in enumerate(engine.parallel_plan.rank_weights)}
            assert engine.executor.loaded_bytes == planned
        results = test_engine.run_staggered(engine)
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        return [results[i] for i in range(len(test_engine.LENGTHS))]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def single(ckpt_factory) -> list[list[int]]:
    return run(ckpt_factory(VARIANT))


@pytest.mark.parametrize("pp, tp, ep", [(2, 1, 1), (3, 1, 1), (4, 1, 1), (1, 2, 1), (1, 2, 2), (2, 2, 2),
                                        (1, 4, 4)])
def test_layout_equals_one_process(ckpt_factory, single, pp: int, tp: int, ep: int) -> None:
    assert run(ckpt_factory(VARIANT), pp=pp, tp=tp, ep=ep) == single


def test_hand_given_split(ckpt_factory, single) -> None:
    assert run(ckpt_factory(VARIANT), pp=2, pp_layers="3,1") == single


def test_alltoall_dispatch_equals_one_process(ckpt_factory, single) -> None:
    assert run(ckpt_factory(VARIANT), tp=2, ep=2, ep_dispatch="alltoall") == single


def test_placement_file_with_copies_equals_one_process(ckpt_factory, single, tmp_path) -> None:
    """Experts 0 and 7 have a copy on both ranks; the all-reduce path still adds each pair once."""
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"phy2log": [[0, 1, 2, 3, 7], [4, 5, 6, 7, 0]]}))
    assert run(ckpt_factory(VARIANT), tp=2, ep=2, expert_placement=str(placement)) == single


def test_rank_that_dies_fails_the_step(ckpt_factory) -> None:
    engine = Engine(EngineConfig(model=str(ckpt_factory(VARIANT)), block_size=4, kv_cache_memory=1 << 22, pp=2))
    try:
        engine.add_request("a", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=50, temperature=0))
        engine.step()
        engine.executor.procs[1].kill()
        with pytest.raises(WorkerError, match="rank 1 exited"):
            for _ in range(50):
                engine.step()
    finally:
        engine.close()


def test_pipeline_keeps_pp_batches_in_flight(ckpt_factory) -> None:
    """With pp stages, decode runs pp interleaved batches (test_layout_equals_one_process shows the tokens stay
    those of one process), a request aborted while its batch is in flight frees its blocks, and every stage
    reports its busy time."""
    from moeserve.launch.cmd_bench import stage_busy

    engine = Engine(EngineConfig(model=str(ckpt_factory(VARIANT)), block_size=4, kv_cache_memory=1 << 22,
                                 max_num_seqs=8, max_num_batched_tokens=32, pp=2))
    try:
        engine.executor.stage_stats(reset=True)
        for i in range(4):
            engine.add_request(f"r{i}", prompt_token_ids=[5 + i, 6, 7], params=SamplingParams(max_tokens=30,
                                                                                              temperature=0))
        while engine.has_unfinished():
            engine.step()
            if "r3" in engine.requests and engine.requests["r3"].num_output_tokens == 5:
                engine._fill_pipeline()
                assert any(s.request.request_id == "r3" for b in engine.in_flight for s in b.sched.scheduled)
                assert engine.abort("r3")
        assert engine.stats.max_in_flight == 2
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        rows = stage_busy(engine, engine.executor.stage_stats(), elapsed=1e9)
        assert [r["stage"] for r in rows] == [0, 1]
        assert all(r["steps"] > 10 and 0 < r["busy_fraction"] < 1 for r in rows)
    finally:
        engine.close()


def test_ranks_outlive_neither_a_killed_launcher_nor_catch_its_group_signals(ckpt_factory) -> None:
    """A coordinator killed with SIGKILL cannot stop its ranks: they notice within seconds and exit. A signal
    to the coordinator's process group (Ctrl-C, ``timeout``) reaches only the coordinator."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "from moeserve.coordinator.config import EngineConfig\n"
              "from moeserve.coordinator.engine import Engine\n"
              "e = Engine(EngineConfig(model=sys.argv[1], block_size=4, kv_cache_memory=1 << 22, pp=2))\n"
              "print(*[p.pid for p in e.executor.procs], flush=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(ckpt_factory(VARIANT))], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        ranks = [int(p) for p in proc.stdout.readline().split()]
        assert len(ranks) == 2
        os.killpg(proc.pid, signal.SIGINT)  # the group: the coordinator (which ignores it), not its ranks
        time.sleep(1)
        assert all(_alive(pid) for pid in ranks)
        proc.kill()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in ranks)
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
