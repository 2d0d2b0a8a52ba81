"""Tensor- and expert-parallel shards in real processes over gloo give the tokens of one process.

Each layout runs in ``tp`` processes that load only their shard from the checkpoint and meet in a real
torch.distributed group; rank 0's logits and greedy tokens are compared with a single process.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeserve.comm.shard import ShardInfo
from moeserve.experts.moe import ExpertPlacement
from moeserve.model.deepseek import ModelSlice
from moeserve.model.loader import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_model_oracle import greedy_absorbed, prompt_ids  # noqa: E402


def _worker(rank: int, world: int, init_file: str, ckpt: str, ep: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        probe = load_model(ckpt, model_slice=ModelSlice(0, 1, 1))  # config only; tiny
        config = probe.config
        placement = ExpertPlacement.contiguous(config.n_routed_experts, rank, world) if ep else None
        shard = ShardInfo(rank, world, dist.group.WORLD)
        layers = config.num_hidden_layers
        model = load_model(ckpt, model_slice=ModelSlice(0, layers, layers, placement, shard, expert_tp=not ep))
        loaded = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            logits, tokens, _ = greedy_absorbed(model, prompt_ids(Path(ckpt)))
        torch.save({"logits": logits, "tokens": tokens, "params": loaded}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["v3_noaux_norm", "v2_qlora_group_yarn"])
@pytest.mark.parametrize("tp, ep", [(2, 1), (2, 2), (4, 4)])
def test_sharded_equals_one_process(ckpt_factory, tmp_path: Path, variant: str, tp: int, ep: int) -> None:
    ckpt = ckpt_factory(variant)
    whole = load_model(ckpt)
    with torch.no_grad():
        ref_logits, ref_tokens, _ = greedy_absorbed(whole, prompt_ids(ckpt))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(tp, str(tmp_path / "rdzv"), str(ckpt), ep > 1, out), nprocs=tp, join=True)
    results = [torch.load(f"{out}.{r}") for r in range(tp)]
    for r in results:
        assert r["tokens"] == ref_tokens
        rel = ((r["logits"] - ref_logits).abs().max() / ref_logits.abs().max()).item()
        assert rel < 1e-5, f"logits differ: max|diff|/max|ref| = {rel:.2e}"
    # each rank holds a share: together no more than the whole plus the replicated parts
    total = sum(p.numel() for p in whole.parameters())
    assert max(r["params"] for r in results) < total
