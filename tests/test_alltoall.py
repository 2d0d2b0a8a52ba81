"""All-to-all expert dispatch in real processes over gloo: the exchange is exact, and the all-to-all MoE
equals one process on the same weights; plus the preflight collective timings.

Each test spawns one group of ``world`` processes (file rendezvous in a tmp dir) and runs all its cases
inside it, to keep process start-up out of the per-case cost.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeserve.comm.alltoall import combine, dispatch
from moeserve.comm.preflight_bench import time_all_reduce, time_all_to_all
from moeserve.comm.shard import ShardInfo
from moeserve.experts.ep_dispatch import holder_table, pick_owner, token_shares
from moeserve.experts.moe import ExpertPlacement, MoE
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import ModelSlice
from moeserve.model.loader import load_model

RAW = {"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
       "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "n_shared_experts": 1,
       "n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2, "kv_lora_rank": 16,
       "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}
NO_SHARED = {**RAW, "n_shared_experts": 0}
# a logical expert on several ranks (redundant copies), every expert somewhere
REDUNDANT = {2: [[0, 1, 2, 3, 7], [4, 5, 6, 7, 0]], 4: [[0, 1, 7], [2, 3, 0], [4, 5, 1], [6, 7, 2]]}


def spawn(fn: Callable[..., None], world: int, tmp_path: Path, *args: Any) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_entry, args=(world, str(tmp_path / "rdzv"), fn, args), nprocs=world, join=True)


def _entry(rank: int, world: int, init_file: str, fn: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


# ---- (a) dispatch + combine with identity experts returns the inputs exactly ----

def _scenario(name: str, rank: int, world: int) -> tuple[int, torch.Tensor]:
    """(tokens on this rank, destination rank of each of its [T, 2] pairs)."""
    gen = torch.Generator().manual_seed(100 * world + rank)
    if name == "uneven":  # one rank sends nothing; counts differ per rank
        num_tokens = [5, 0, 3, 7][rank]
        return num_tokens, torch.randint(0, world, (num_tokens, 2), generator=gen)
    if name == "one_owner":  # every pair goes to the last rank: the others receive zero rows
        num_tokens = 4 + rank
        return num_tokens, torch.full((num_tokens, 2), world - 1)
    assert name == "empty"  # nobody has tokens
    return 0, torch.zeros(0, 2, dtype=torch.long)


def _identity_worker(rank: int, world: int) -> None:
    for name in ("uneven", "one_owner", "empty"):
        num_tokens, dest = _scenario(name, rank, world)
        # integer-valued rows and weights: every sum below is exact in float32
        x = torch.randint(-50, 50, (num_tokens, 6)).float() + 1000 * rank
        ids = dest * 100 + torch.arange(2)  # expert "ids" that name their owner
        weights = torch.randint(1, 4, (num_tokens, 2)).float()
        got = dispatch(x, dest, ids, weights, None)
        valid = got.expert_ids >= 0
        assert bool((got.expert_ids[valid] // 100 == rank).all()), name  # only pairs owned here arrive
        assert bool((got.weights[~valid] == 0).all()) and bool((got.weights[valid] >= 1).all()), name
        pairs = torch.tensor([int(valid.sum()), num_tokens * 2])
        dist.all_reduce(pairs)
        assert pairs[0] == pairs[1], f"{name}: {pairs.tolist()}"  # no pair lost or duplicated
        y = got.x * (got.weights * valid).sum(1, keepdim=True)  # identity experts, weighted
        assert torch.equal(combine(y, got.layout, None), x * weights.sum(1, keepdim=True)), name


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_combine_identity_is_exact(tmp_path: Path, world: int) -> None:
    spawn(_identity_worker, world, tmp_path)


# ---- (b) the all-to-all MoE equals one process ----

def make_moe(raw: dict, placement: ExpertPlacement | None = None, shard: ShardInfo | None = None,
             dispatch_mode: str = "allreduce") -> MoE:
    return MoE(ModelConfig.from_dict(raw), placement, torch.float32, shard or ShardInfo(),
               dispatch=dispatch_mode)


def whole_moe(raw: dict) -> MoE:
    torch.manual_seed(0)
    moe = make_moe(raw)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.e_score_correction_bias.normal_(0, 0.1)
    return moe


def shard_of(whole: MoE, raw: dict, rank: int, world: int, phy2log: list[int],
             every_rank: list[list[int]] | None = None) -> MoE:
    """This rank's share of ``whole``: its routed experts, its tp slice of the shared experts. With
    ``every_rank`` the layer's map knows the whole placement from the start (as workers build it), else it
    gathers the other ranks' slots at its first forward."""
    shard = ShardInfo(rank, world, dist.group.WORLD)
    placement = ExpertPlacement.from_ranks(every_rank, rank) if every_rank else \
        ExpertPlacement(whole.spec.num_experts, tuple(phy2log))
    part = make_moe(raw, placement, shard, "alltoall")
    with torch.no_grad():
        part.gate_weight.copy_(whole.gate_weight)
        part.e_score_correction_bias.copy_(whole.e_score_correction_bias)
        part.w13.copy_(whole.w13[phy2log])
        part.w2.copy_(whole.w2[phy2log])
        if whole.shared_experts is not None and part.shared_experts is not None:
            inter = part.shared_experts.intermediate_size
            rows = slice(rank * inter, (rank + 1) * inter)
            gate, up = whole.shared_experts.gate_up_proj.chunk(2)
            part.shared_experts.gate_up_proj.copy_(torch.cat([gate[rows], up[rows]]))
            part.shared_experts.down_proj.copy_(whole.shared_experts.down_proj[:, rows])
    return part


CASES = [("shared", RAW, False), ("no_shared", NO_SHARED, False), ("redundant", RAW, True),
         ("redundant_whole", RAW, True)]


def _moe_worker(rank: int, world: int, token_counts: list[int], out: str) -> None:
    results = {}
    for name, raw, redundant in CASES:
        phy2log = (REDUNDANT[world][rank] if redundant
                   else list(ExpertPlacement.contiguous(8, rank, world).local_logical_ids))
        part = shard_of(whole_moe(raw), raw, rank, world, phy2log,
                        REDUNDANT[world] if name == "redundant_whole" else None)
        for num_tokens in token_counts:
            x = torch.randn(num_tokens, 32, generator=torch.Generator().manual_seed(num_tokens))
            with torch.no_grad():
                results[name, num_tokens] = part(x)
        results[name, "counts"] = part.tokens_per_expert.clone()
    torch.save(results, f"{out}.{rank}")


@pytest.mark.parametrize("world, token_counts", [(2, [7, 1]), (4, [7, 3, 10])])
def test_alltoall_moe_equals_one_process(tmp_path: Path, world: int, token_counts: list[int]) -> None:
    out = str(tmp_path / "result")
    spawn(_moe_worker, world, tmp_path, token_counts, out)
    results = [torch.load(f"{out}.{r}") for r in range(world)]
    for name, raw, _ in CASES:
        whole = whole_moe(raw)
        for num_tokens in token_counts:
            x = torch.randn(num_tokens, 32, generator=torch.Generator().manual_seed(num_tokens))
            with torch.no_grad():
                ref = whole(x)
            for rank, r in enumerate(results):
                diff = (r[name, num_tokens] - ref).abs().max().item()
                assert diff <= 1e-5, f"{name}, T={num_tokens}, rank {rank}: max |diff| = {diff:.2e}"
        for r in results:  # every rank counts all tokens, as one process does
            assert torch.equal(r[name, "counts"], whole.tokens_per_expert), name


def _model_worker(rank: int, world: int, ckpt: str, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_model_oracle import greedy_absorbed, prompt_ids

    config = load_model(ckpt, model_slice=ModelSlice(0, 1, 1)).config  # config only; tiny
    layers = config.num_hidden_layers
    model_slice = ModelSlice(0, layers, layers, ExpertPlacement.contiguous(config.n_routed_experts, rank, world),
                             ShardInfo(rank, world, dist.group.WORLD), ep_dispatch="alltoall")
    model = load_model(ckpt, model_slice=model_slice)
    assert model.moe_layers() and all(moe.all_to_all is not None for moe in model.moe_layers().values())
    with torch.no_grad():
        logits, tokens, _ = greedy_absorbed(model, prompt_ids(Path(ckpt)))
    torch.save({"logits": logits, "tokens": tokens}, f"{out}.{rank}")


def test_alltoall_model_equals_one_process(ckpt_factory, tmp_path: Path) -> None:
    """ModelSlice.ep_dispatch reaches every MoE layer; prefill and one-token decode steps (fewer tokens
    than ranks) give the logits and greedy tokens of one process."""
    from test_model_oracle import greedy_absorbed, prompt_ids

    ckpt = ckpt_factory("v3_noaux_norm")
    with torch.no_grad():
        ref_logits, ref_tokens, _ = greedy_absorbed(load_model(ckpt), prompt_ids(ckpt))
    out = str(tmp_path / "result")
    spawn(_model_worker, 2, tmp_path, str(ckpt), out)
    for rank in range(2):
        r = torch.load(f"{out}.{rank}")
        assert r["tokens"] == ref_tokens
        rel = ((r["logits"] - ref_logits).abs().max() / ref_logits.abs().max()).item()
        assert rel < 1e-5, f"rank {rank}: max|diff|/max|ref| = {rel:.2e}"


# ---- pure helpers ----

def test_token_shares_cover_every_token() -> None:
    assert token_shares(7, 4) == [2, 2, 2, 1]
    assert token_shares(2, 4) == [1, 1, 0, 0]
    assert token_shares(8, 2) == [4, 4]


def test_redundant_copies_take_tokens_in_turn() -> None:
    holders, copies = holder_table(torch.tensor(REDUNDANT[2]), 8)
    assert copies.tolist() == [2, 1, 1, 1, 1, 1, 1, 2]
    ids = torch.tensor([[0, 7], [0, 1], [0, 4], [7, 5]])
    # expert 0 on ranks 0 and 1, expert 7 on ranks 1 and 0 (ascending: 0, 1); token 10 + i picks copy (10+i) % 2
    assert pick_owner(ids, 10, holders, copies).tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    with pytest.raises(ValueError, match="held by some rank"):
        holder_table(torch.tensor([[0, 1], [1, 2]]), 4)


def test_alltoall_needs_experts_spread_over_ranks() -> None:
    with pytest.raises(ValueError, match="ep == tp"):
        MoE(ModelConfig.from_dict(RAW), None, torch.float32, ShardInfo(), expert_tp=True, dispatch="alltoall")
    with pytest.raises(ValueError, match="dispatch must be one of"):
        make_moe(RAW, dispatch_mode="ring")


# ---- preflight timings ----

def _bench_worker(rank: int, world: int, out: str) -> None:
    timings = [time_all_reduce(None, 1 << 16, "cpu", iters=5), time_all_to_all(None, 1 << 16, "cpu", iters=5)]
    torch.save([(t.op, t.nbytes, t.world_size, t.seconds, t.algbw, t.busbw) for t in timings], f"{out}.{rank}")


def test_preflight_timings_on_gloo(tmp_path: Path) -> None:
    out = str(tmp_path / "bench")
    spawn(_bench_worker, 2, tmp_path, out)
    per_rank = [torch.load(f"{out}.{r}") for r in range(2)]
    assert per_rank[0] == per_rank[1]  # every rank reports the slowest rank's median
    for op, nbytes, world, seconds, algbw, busbw in per_rank[0]:
        assert op in ("all_reduce", "all_to_all") and nbytes == 1 << 16 and world == 2
        assert 0 < seconds < 5
        assert algbw == pytest.approx(nbytes / seconds)
        assert busbw == pytest.approx(algbw * (1.0 if op == "all_reduce" else 0.5))
