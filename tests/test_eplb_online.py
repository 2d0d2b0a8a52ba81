"""Online expert rebalancing over real stage workers (gloo): rebalances forced every few steps, with
redundant slots, while requests are mid-prefill and decoding; the greedy tokens stay those of one process."""

from __future__ import annotations

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


@pytest.mark.parametrize("ep, redundant, forced", [(2, 2, False), (4, 4, True)], ids=["ep2-interval", "ep4-forced"])
def test_tokens_identical_across_rebalances(ckpt_factory, single, ep: int, redundant: int, forced: bool) -> None:
    """EP 2 rebalances on its own (--eplb-interval 3, threshold 1: whenever the plan is better); EP 4 is
    forced every 4 steps, as POST /admin/rebalance does."""
    automatic = {} if forced else {"eplb_interval": 3, "eplb_threshold": 1.0, "eplb_hysteresis": 0.0}
    engine = Engine(EngineConfig(model=str(ckpt_factory(VARIANT)), block_size=4, kv_cache_memory=1 << 22,
                                 max_num_seqs=8, max_num_batched_tokens=32, tp=ep, ep=ep,
                                 num_redundant_experts=redundant, expert_load_interval=2, eplb_layers_per_step=1,
                                 **automatic))
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
        view = engine.expert_load.flush()
    finally:
        engine.close()
    assert tokens == single
    applied = [r for r in engine.expert_load.aggregator.rebalances if r.result == "applied"]
    assert applied, engine.expert_load.aggregator.rebalances
    seen = placements + [engine.expert_load.aggregator.phy2log]  # before each step, and at the end
    changes = sum(1 for a, b in zip(seen, seen[1:]) if not torch.equal(a, b))
    assert changes == len(applied)  # every applied rebalance changed the placement between two steps
    assert view is not None and view.phy2log is not None
    assert view.phy2log.shape == (ep, (8 + redundant) // ep)
    assert int(view.physical_total.sum()) <= int(view.total.sum())  # slots count since the last swap
    if engine.stats.num_steps - applied[-1].step > 1:  # a swap at the very end leaves nothing counted since
        assert int(view.physical_total.sum()) > 0
