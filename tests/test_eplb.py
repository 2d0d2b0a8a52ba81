"""The EPLB planner: pure functions, on skewed and uniform loads, and a property test over random ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.experts.eplb import balancedness, num_moves, plan_placement, rank_loads, replicate


def check_valid(phy2log: torch.Tensor, num_experts: int) -> None:
    """Every logical expert keeps a slot; no rank holds two copies of one expert."""
    for layer in phy2log:
        assert set(layer.flatten().tolist()) == set(range(num_experts))
        for rank in layer:
            assert len(set(rank.tolist())) == len(rank)


def test_uniform_load_needs_no_move() -> None:
    current = torch.arange(16).view(1, 4, 4)
    new = plan_placement(torch.ones(1, 16), 4, 4, current=current)
    check_valid(new, 16)
    assert num_moves(current[0], new[0]) == 0
    assert balancedness(rank_loads(torch.ones(1, 16), new)).item() == 1.0


def test_skewed_load_gets_copies_and_balance() -> None:
    """Two hot experts on one rank: with 4 redundant slots they get 3 copies each. Two ranks must then hold
    two heavy copies (6 of them over 4 ranks) plus 3 light experts: 40/3 + 30/3 + 3 is the best peak."""
    weight = torch.ones(1, 16)
    weight[0, 0], weight[0, 1] = 40.0, 30.0
    contiguous = torch.arange(16).view(1, 4, 4)
    before = balancedness(rank_loads(weight, contiguous)).item()
    new = plan_placement(weight, 4, 5)
    check_valid(new, 16)
    copies = torch.bincount(new.flatten(), minlength=16)
    assert copies[0] >= 2 and copies[1] >= 2
    after = balancedness(rank_loads(weight, new)).item()
    assert before < 0.3 and after == pytest.approx((84 / 4) / (40 / 3 + 10 + 3))


def test_replicate_gives_slots_to_the_heaviest() -> None:
    copies = replicate(torch.tensor([[8.0, 1.0, 1.0, 2.0]]), 7, max_copies=4)
    assert copies.tolist() == [[4, 1, 1, 1]]


def test_hierarchical_keeps_groups_on_a_node() -> None:
    """8 experts in 4 groups of 2 on 2 nodes x 2 ranks: each group's experts sit on one node."""
    weight = torch.tensor([[9.0, 8.0, 1.0, 1.0, 5.0, 5.0, 2.0, 1.0]])
    new = plan_placement(weight, 4, 3, num_nodes=2, num_groups=4)
    check_valid(new, 8)
    for node in range(2):
        held = set(new[0, 2 * node:2 * node + 2].flatten().tolist())
        for g in range(4):
            assert {2 * g, 2 * g + 1} <= held or not {2 * g, 2 * g + 1} & held


def test_few_moves_from_current() -> None:
    """Only a small change in load: the plan stays close to the current placement."""
    weight = torch.ones(1, 12)
    weight[0, 5] = 6.0
    first = plan_placement(weight, 3, 5)
    weight[0, 6] = 1.5
    second = plan_placement(weight, 3, 5, current=first)
    check_valid(second, 12)
    assert num_moves(first[0], second[0]) <= 4


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(0, 6), st.integers(1, 3), st.data())
def test_every_expert_keeps_a_slot(num_ranks: int, extra: int, per_rank_experts: int, data) -> None:
    num_experts = num_ranks * per_rank_experts
    slots = per_rank_experts + extra
    if slots > num_experts:  # a rank cannot hold more distinct experts than exist
        slots = num_experts
    loads = data.draw(st.lists(st.integers(0, 1000), min_size=num_experts, max_size=num_experts))
    weight = torch.tensor([loads], dtype=torch.float64)
    current = None
    if data.draw(st.booleans()):
        current = plan_placement(torch.rand(1, num_experts), num_ranks, slots)
    nodes = 2 if num_ranks % 2 == 0 and data.draw(st.booleans()) else 1
    groups = data.draw(st.sampled_from([1, 2, num_experts]))
    new = plan_placement(weight, num_ranks, slots, num_nodes=nodes, num_groups=groups, current=current)
    assert new.shape == (1, num_ranks, slots)
    check_valid(new, num_experts)
