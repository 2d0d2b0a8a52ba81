"""Expert-load counters on every rank of every layout: each MoE layer's counts are the step's tokens x top_k.

Real engines (one process, and stage workers over gloo); the only thing added is a tally of the tokens each
step plan carried, taken where the engine hands the plan to its runner.
"""

from __future__ import annotations

import json

import pytest
import test_engine  # noqa: E402  (tests/ is on sys.path via conftest)
import torch

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.experts.eplb import balancedness
from moeserve.experts.load_counter import ExpertLoadCounter, count_routed
from moeserve.model.config import ModelConfig

VARIANT = "v3_noshared"


def tally_plans(engine: Engine) -> dict[str, int]:
    """Count the prefill and decode tokens of every plan the engine submits (decode: query_len == 1)."""
    seen = {"prefill": 0, "decode": 0}
    submit = engine.executor.submit

    def counting_submit(plan, prev_token_ids=None):
        seen["decode"] += sum(1 for q in plan.query_lens if q == 1)
        seen["prefill"] += sum(q for q in plan.query_lens if q > 1)
        return submit(plan, prev_token_ids)

    engine.executor.submit = counting_submit  # type: ignore[method-assign]
    return seen


def check_counts(ckpt, placement=None, **parallel) -> None:
    engine = Engine(EngineConfig(model=str(ckpt), block_size=4, kv_cache_memory=1 << 22, max_num_seqs=8,
                                 max_num_batched_tokens=32, expert_load_interval=3, **parallel))
    top_k = ModelConfig.from_hf(ckpt).num_experts_per_tok
    try:
        seen = tally_plans(engine)
        test_engine.run_staggered(engine)
        view = engine.expert_load.flush()
    finally:
        engine.close()
    assert view is not None and view.layer_ids
    assert view.total.shape[:2] == (len(view.layer_ids), 2)
    for layer in range(len(view.layer_ids)):  # [2, E]: prefill row, decode row
        assert view.total[layer, 0].sum() == seen["prefill"] * top_k
        assert view.total[layer, 1].sum() == seen["decode"] * top_k
        assert torch.equal(view.physical_total[layer].sum(-1), view.total[layer].sum(-1))
    if view.phy2log is not None:  # each slot's pairs are its logical expert's, by the layer's own placement
        assert view.phy2log.shape[0] == len(view.layer_ids)
        for layer in range(len(view.layer_ids)):
            by_expert = torch.zeros_like(view.total[layer]).index_add_(1, view.phy2log[layer].flatten(),
                                                                       view.physical_total[layer])
            assert torch.equal(by_expert, view.total[layer])
    if placement is not None:  # copies of an expert each serve some of its pairs
        assert view.phy2log is not None and view.phy2log.tolist() == [placement] * len(view.layer_ids)


@pytest.mark.parametrize("parallel", [{}, {"tp": 2, "ep": 2}, {"pp": 2}, {"tp": 2, "ep": 1},
                                      {"tp": 2, "ep": 2, "ep_dispatch": "alltoall"}],
                         ids=["one", "tp2ep2", "pp2", "tp2ep1", "alltoall"])
def test_counts_are_tokens_times_top_k(ckpt_factory, parallel) -> None:
    check_counts(ckpt_factory(VARIANT), **parallel)


def test_counts_with_copies(ckpt_factory, tmp_path) -> None:
    placement = [[0, 1, 2, 3, 7], [4, 5, 6, 7, 0]]
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"phy2log": placement}))
    check_counts(ckpt_factory(VARIANT), placement, tp=2, ep=2, expert_placement=str(path))


def test_counter_shares_and_phases() -> None:
    """Two ranks that see the same 5 tokens count 3 and 2 of them; the first 2 tokens are decode tokens;
    a copied expert's pairs go to its copies by token index."""
    phy2log = torch.tensor([[0, 1, 3], [2, 3, 0]])
    ids = torch.tensor([[0, 3], [1, 3], [3, 2], [0, 1], [2, 0]])
    total = torch.zeros(2, 2, 4, dtype=torch.long)
    slots = torch.zeros(2, 2, 6, dtype=torch.long)
    for rank in range(2):
        counter = ExpertLoadCounter([5], 4, torch.device("cpu"), phy2log, rank, 2)
        counter.begin_step(2)
        count_routed(counter, 5, ids)
        total += counter.logical
        slots += counter.physical
    assert total[0, 1].tolist() == [1, 1, 0, 2] and total[0, 0].tolist() == [2, 1, 2, 1]
    # expert 3 sits in slot 2 (rank 0) and slot 4 (rank 1): tokens 0, 2 -> rank 0, token 1 -> rank 1
    assert slots[0].sum(0)[[2, 4]].tolist() == [2, 1]
    assert slots[0].sum(0)[[0, 5]].tolist() == [2, 1]  # expert 0: tokens 0 and 4 (rank 0), 3 (rank 1)


def test_balancedness() -> None:
    load = torch.tensor([[10, 10], [30, 10], [0, 0]])
    assert balancedness(load).tolist() == pytest.approx([1.0, 20 / 30, 1.0])


def test_load_message_checks_its_bytes() -> None:
    from moeserve.comm.messages import ExpertLoadMsg, MessageError, decode, encode

    logical, physical = torch.arange(12).view(1, 2, 6), torch.arange(16).view(1, 2, 8)
    msg = decode(encode(ExpertLoadMsg.of(3, 7, [2], logical, physical)))
    got = msg.tensors()
    assert torch.equal(got[0], logical) and torch.equal(got[1], physical)
    msg.num_physical = 9
    with pytest.raises(MessageError, match="bytes for"):
        msg.tensors()
