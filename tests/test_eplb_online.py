"""Online expert rebalancing over real stage workers (gloo): rebalances forced every few steps, with
redundant slots, while requests are mid-prefill and decoding; the greedy tokens stay those of one process."""

from __future__ import annotations

import shutil

import pytest
import test_engine  # noqa: E402  (tests/ is on sys.path via conftest)
import torch

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine

VARIANT = "v3_noshared"


@pytest.fixture(scope="module")
def single(ckpt_factory) -> dict[int, list[int]]:
    engine = Engine(EngineConfig(model=str(ckpt_factory(VARIANT)), block_size=4, kv_cache_memory=1 << 22,
                                 max_num_seqs=8, max_num_batched_tokens=32))
    return test_engine.run_staggered(engine)


@pytest.mark.parametrize("ep, redundant, forced, layout", [
    (2, 2, False, {}), (4, 4, True, {}), (2, 2, True, {"ep_dispatch": "alltoall"}), (2, 2, True, {"pp": 2})],
    ids=["ep2-interval", "ep4-forced", "ep2-alltoall-forced", "pp2-ep2-forced"])
def test_tokens_identical_across_rebalances(ckpt_factory, single, tmp_path, ep: int, redundant: int,
                                            forced: bool, layout: dict) -> None:
    """EP 2 rebalances on its own (--eplb-interval 3, threshold 1: whenever the plan is better); the others
    are forced every 4 steps, as POST /admin/rebalance does: EP 4, EP 2 with the all-to-all dispatch, and two
    pipeline stages of EP 2 (each stage moves its own layers). Each layer is planned on its own and its moves are
    cut into one-slot chunks (a stall bound of 1 us), each applied between two steps; the checkpoint's
    weights are deleted once the ranks have loaded them, so every moved slot comes from another rank."""
    model = tmp_path / "model"
    shutil.copytree(ckpt_factory(VARIANT), model)
    automatic = {} if forced else {"eplb_interval": 3, "eplb_threshold": 1.0, "eplb_hysteresis": 0.0}
    engine = Engine(EngineConfig(model=str(model), block_size=4, kv_cache_memory=1 << 22,
                                 max_num_seqs=8, max_num_batched_tokens=32, tp=ep, ep=ep,
                                 num_redundant_experts=redundant, expert_load_interval=2, eplb_max_stall_ms=1e-3,
                                 **automatic, **layout))
    for weights in model.glob("*.safetensors"):
        weights.unlink()  # moved experts must come from the ranks that hold them
    rebalancer = engine.expert_load.rebalancer
    assert rebalancer is not None
    step = engine.step
    placements = []

    def step_and_rebalance():  # what POST /admin/rebalance does, every 4 steps
        if forced and engine.stats.num_steps % 4 == 1:
            rebalancer.request()
        placements.append(engine.expert_load.aggregator.phy2log)
        return step()

    engine.step = step_and_rebalance  # type: ignore[method-assign]
    try:
        tokens = test_engine.run_staggered(engine)
        while rebalancer.staging:  # the last chunks, while idle
            engine.expert_load.idle()
        view = engine.expert_load.flush()
    finally:
        engine.close()
    assert tokens == single
    records = engine.expert_load.aggregator.rebalances
    applied = [r for r in records if r.result == "applied"]
    assert applied and not [r for r in records if r.result == "failed"], records
    assert {r.layer for r in applied} <= set(view.layer_ids)
    seen = placements + [engine.expert_load.aggregator.phy2log]  # before each step, and at the end
    changes = [i for i, (a, b) in enumerate(zip(seen, seen[1:])) if not torch.equal(a, b)]
    # every chunk changed one layer's placement between two steps (or while idle, at the end)
    assert len(changes) <= sum(r.chunks for r in applied)
    for a, b in zip(seen, seen[1:]):
        assert int((a != b).any(-1).any(-1).sum()) <= 1  # one layer at a time
    assert any(r.chunks > 1 for r in applied)  # the stall bound cut some layer's move into chunks
    for r in applied:
        assert r.moves >= r.chunks >= 1 and r.max_stall_s > 0
    assert view is not None and view.phy2log is not None
    assert view.phy2log.shape == (len(view.layer_ids), ep, (8 + redundant) // ep)
    assert len({tuple(layer.flatten().tolist()) for layer in view.phy2log}) > 1  # each layer its own placement
    assert int(view.physical_total.sum()) <= int(view.total.sum())  # slots count since each layer's last move
