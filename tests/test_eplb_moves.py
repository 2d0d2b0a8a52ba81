"""A layer's move from one placement to another, in chunks (every placement between two chunks serves every
expert; a chunk has at most the bound's slots unless experts trade places), the source of each changed
slot's weights, the per-layer bookkeeping of the coordinator, and the rebalancer's back-off."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.coordinator.eplb_policy import Backoff, predicted_gain
from moeserve.coordinator.expert_load import LoadAggregator
from moeserve.experts.eplb import balancedness, plan_placement, rank_loads
from moeserve.experts.expert_moves import changed_slots, next_chunk, serves_every_expert, transfers


def walk(current: torch.Tensor, target: torch.Tensor, max_slots: int, num_experts: int) -> list[torch.Tensor]:
    steps = [current]
    while not torch.equal(steps[-1], target):
        steps.append(next_chunk(steps[-1], target, max_slots, num_experts))
        assert len(steps) <= current.numel() + 1, "no progress"
    return steps


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 4), st.integers(1, 3), st.integers(0, 3), st.integers(1, 4), st.data())
def test_chunks_serve_every_expert_and_reach_the_target(ranks: int, per_rank: int, extra: int, max_slots: int,
                                                         data) -> None:
    num_experts = ranks * per_rank
    slots = min(per_rank + extra, num_experts)
    loads = [torch.tensor([data.draw(st.lists(st.integers(0, 100), min_size=num_experts, max_size=num_experts))],
                          dtype=torch.float64) for _ in range(2)]
    current = plan_placement(loads[0], ranks, slots)[0]
    target = plan_placement(loads[1], ranks, slots)[0]
    steps = walk(current, target, max_slots, num_experts)
    for before, after in zip(steps, steps[1:]):
        assert serves_every_expert(after, num_experts)
        changed = changed_slots(before, after)
        # more than the bound only where every change alone would drop an expert's last copy
        if len(changed) > max_slots:
            assert not any(serves_every_expert(_with(before, after, r, s), num_experts) for r, s in changed)
        for t in transfers(before, after):  # the source holds the expert before the chunk
            assert before[t.src, t.src_slot] == after[t.dst, t.dst_slot]


def _with(before: torch.Tensor, after: torch.Tensor, rank: int, slot: int) -> torch.Tensor:
    out = before.clone()
    out[rank, slot] = after[rank, slot]
    return out


def test_experts_that_trade_places_move_together() -> None:
    """Ranks 0 and 1 swap their only copies: no single slot can go first."""
    current, target = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[2, 1], [0, 3]])
    assert torch.equal(next_chunk(current, target, 1, 4), target)


def test_transfers_prefer_a_local_copy_and_spread_over_holders() -> None:
    current = torch.tensor([[0, 1, 2], [3, 0, 4], [5, 0, 1]])
    new = torch.tensor([[0, 1, 0], [3, 0, 1], [5, 0, 0]])
    moves = {(t.dst, t.dst_slot): (t.src, t.src_slot) for t in transfers(current, new)}
    assert moves[0, 2] == (0, 0)  # rank 0 holds expert 0 in slot 0 already
    assert moves[1, 2] == (0, 1)  # expert 1: rank 0's slot 1 (first holder)
    assert moves[2, 2] == (2, 1)  # rank 2 holds expert 0 in slot 1 already


def test_predicted_gain_is_the_heaviest_ranks_speed_up() -> None:
    weight = torch.tensor([[6.0, 1.0, 1.0, 1.0, 1.0, 2.0]])
    current = torch.tensor([[[0, 1, 5], [2, 3, 4]]])  # rank loads 9 and 3: balancedness 6 / 9
    new = plan_placement(weight, 2, 3, current=current)
    now, after = balancedness(rank_loads(weight, current)), balancedness(rank_loads(weight, new))
    peak_now, peak_after = rank_loads(weight, current).max(), rank_loads(weight, new).max()
    assert predicted_gain(float(now[0]), float(after[0])) == pytest.approx(float(peak_now / peak_after) - 1)
    assert predicted_gain(float(after[0]), float(after[0])) == 0.0  # a plan does not gain on itself


def test_backoff_doubles_on_a_measured_non_gain_and_clears_on_a_gain() -> None:
    backoff = Backoff(min_gain=0.02)
    waits = []
    for _ in range(3):
        assert not backoff.judge(7, before=0.80, measured_after=0.81)
        waited = 0
        while backoff.sits_out(7):
            waited += 1
        waits.append(waited)
    assert waits == [1, 2, 4]
    assert not backoff.sits_out(3)  # other layers are not held back
    assert backoff.judge(7, before=0.80, measured_after=0.95)
    assert not backoff.judge(7, before=0.80, measured_after=0.80)
    assert backoff.sits_out(7) and not backoff.sits_out(7)  # back to one check


def test_aggregator_keeps_totals_across_a_layers_move() -> None:
    """A layer's physical counts restart with its new placement; what its ranks served before stays in the
    total; the other layers are untouched."""
    start = torch.tensor([[0, 1, 3], [2, 3, 0]])
    agg = LoadAggregator((1, 2), 4, start)
    logical = torch.tensor([[[5, 1, 1, 3], [0, 0, 0, 0]], [[2, 2, 2, 2], [0, 0, 0, 0]]])
    physical = torch.tensor([[[5, 1, 2, 1, 1, 0], [0] * 6], [[1, 2, 1, 2, 1, 1], [0] * 6]])
    agg.update(0, (1, 2), logical, physical)
    before = agg.close_window(4).rank_load("total").clone()
    agg.set_layer_placement(2, torch.tensor([[0, 1, 2], [3, 2, 0]]))
    view = agg.view
    assert view is not None and view.phy2log is not None
    assert view.phy2log[0].tolist() == start.tolist() and view.phy2log[1].tolist() == [[0, 1, 2], [3, 2, 0]]
    assert torch.equal(view.rank_load("total"), before)
    assert int(view.rank_load("placement")[1].sum()) == 0 and torch.equal(view.rank_load("placement")[0], before[0])
    agg.update(0, (1, 2), logical, torch.stack([physical[0], torch.tensor([[1, 0, 0, 0, 0, 1], [0] * 6])]))
    after = agg.close_window(8)
    assert after.rank_load("placement")[1].tolist() == [1, 1]
    assert torch.equal(after.rank_load("total")[1], before[1] + torch.tensor([1, 1]))
