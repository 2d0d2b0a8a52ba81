"""Self-healing (coordinator/supervisor.py): a rank killed with SIGKILL is replaced -- every rank of the
replica restarts on a fresh torch.distributed group -- and the requests go on with exactly the tokens of a run
without the fault: queued and prefilling ones, and streams mid-decode (resumed from their prompt and sent
tokens), or those end with a typed, retryable error when resuming is off. A rank that keeps dying stops the
engine after --max-restarts, naming it.

Real processes: the engine loop (``EngineDriver``) over stage worker processes on gloo, then ``moeserve serve``
as a subprocess under concurrent HTTP and RPC streams.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.engine_driver import EngineDriver
from moeserve.coordinator.executor import WorkerError
from moeserve.coordinator.sampling import SamplingParams
from moeserve.coordinator.supervisor import RestartBudget, StreamInterrupted
from moeserve.stages.worker_spec import WorkerSpec

VARIANT = "v3_noshared"
PROMPTS = [[5 + i, 6, 7, 8 + i] * (i + 1) for i in range(5)]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)


def test_restart_budget_counts_failures_in_the_window() -> None:
    budget = RestartBudget(max_restarts=2, window_s=10)
    assert budget.allow(0) and budget.allow(1)
    assert not budget.allow(2)  # a third failure within 10 s
    assert budget.allow(12.5)  # the first two have left the window


def test_next_generation_has_a_fresh_file_rendezvous() -> None:
    spec = WorkerSpec(rank=1, pp=2, tp=1, ep=1, model="m", dtype="float32", device="cpu", block_size=4,
                      num_blocks=8, stage_layers=(2, 2), init_method="file:///tmp/x.gz/rendezvous", coord_addr="ipc://c")
    one, two = spec.next_generation(), spec.next_generation().next_generation()
    assert (one.generation, one.init_method) == (1, "file:///tmp/x.gz/rendezvous.g1")
    assert (two.generation, two.init_method) == (2, "file:///tmp/x.gz/rendezvous.g2")
    assert spec.identity != one.identity != two.identity
    tcp = WorkerSpec(**{**spec.__dict__, "init_method": "tcp://10.0.0.1:29502"})
    assert tcp.next_generation().init_method == "tcp://10.0.0.1:29502"  # rank 0 hosts it again


def drive(ckpt: Path, kill: list[int], **config) -> tuple[dict[str, list], EngineDriver]:
    """Run PROMPTS (the last one seeded) through an engine loop over stage workers, SIGKILLing the last rank at
    each loop iteration in ``kill``; returns each request's published items (token ids, or an exception)."""
    engine = Engine(EngineConfig(model=str(ckpt), block_size=4, kv_cache_memory=1 << 22, max_num_seqs=3,
                                 max_num_batched_tokens=32, kv_host_memory=0, **config))
    got: dict[str, list] = {}

    def publish(batch) -> None:
        for rid, item in batch:
            got.setdefault(rid, []).extend([item] if isinstance(item, Exception) else item.output.new_token_ids)
            if not isinstance(item, Exception) and item.output.finished:
                got[rid].append("finished")

    driver = EngineDriver(engine, publish)
    try:
        for i, prompt in enumerate(PROMPTS):
            driver.add(f"r{i}", prompt, SEEDED if i == len(PROMPTS) - 1 else GREEDY)
        n = 0
        while driver.has_work():
            driver.run_once()
            n += 1
            if n in kill:
                engine.executor.procs[-1].kill()  # type: ignore[attr-defined]
        return got, driver
    finally:
        engine.close()


@pytest.fixture(scope="module")
def ckpt(ckpt_factory) -> Path:
    return ckpt_factory(VARIANT)


@pytest.fixture(scope="module")
def reference(ckpt) -> dict[str, list]:
    return drive(ckpt, [], pp=2)[0]


@pytest.mark.parametrize("layout", [{"pp": 2}, {"tp": 2}])
def test_a_killed_rank_is_replaced_and_every_request_gets_its_tokens(ckpt, reference, layout) -> None:
    """Killed after 6 loop iterations: some streams are mid-decode, others still queued (max_num_seqs 3); each
    gets exactly the fault-free tokens, once (the seeded one too: its generator's position is kept)."""
    got, driver = drive(ckpt, [6], **layout)
    assert got == reference
    snap = driver.snapshot
    rank = str(layout.get("pp", 1) * layout.get("tp", 1) - 1)
    assert snap.rank_restarts == {f"{rank}/0": 1} and not snap.recovering
    assert snap.num_resumed_requests >= 1 and snap.num_requeued_requests >= 1
    assert 0 < snap.last_recovery_s < 30


def test_without_resume_streams_mid_decode_end_typed_and_queued_ones_complete(ckpt, reference) -> None:
    got, driver = drive(ckpt, [6], pp=2, resume_streams=False)
    ended = [rid for rid, items in got.items() if isinstance(items[-1], StreamInterrupted)]
    assert ended
    for rid, items in got.items():
        if rid in ended:  # what it had sent was right, then one typed error
            tokens = items[:-1]
            assert tokens == reference[rid][:len(tokens)] and tokens and "--no-resume-streams" in str(items[-1])
        else:
            assert items == reference[rid]
    assert driver.snapshot.num_resumed_requests == 0


def test_a_rank_that_keeps_dying_stops_the_engine_naming_it(ckpt) -> None:
    with pytest.raises(WorkerError, match=r"rank 1 exited with code -9 -- 2 rank failures within 600 s, more "
                                          r"than --max-restarts 1"):
        drive(ckpt, [4, 8], pp=2, max_restarts=1)
