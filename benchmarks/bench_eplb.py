"""Online expert rebalancing on a skewed workload: rank load and decode throughput before and after.

The benchmark writes a DeepSeek-V3-shaped checkpoint (sigmoid router with noaux_tc, random weights) whose
router bias ``e_score_correction_bias`` makes a few experts hot, starts an EP engine over stage workers
with redundant slots, and runs the same batch three times: (A) on the static starting placement, (B) while a
forced rebalance stages and swaps the new placement, (C) on the new placement. It reports per phase the
max / mean rank load (routed pairs each EP rank served, over all MoE layers) and the decode throughput, and
for (B) the longest step against the median step.

    python benchmarks/bench_eplb.py --ep 4 --num-redundant-experts 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SKEWED_V3 = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 4096,
    "hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 8, "n_shared_experts": 1, "n_routed_experts": 16,
    "num_experts_per_tok": 4, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "kv_lora_rank": 128, "q_lora_rank": None, "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 64, "v_head_dim": 64, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "routed_scaling_factor": 1.0, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 1024,
    "rope_theta": 10000, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "torch_dtype": "float32", "hidden_act": "silu", "attention_bias": False,
}
HOT = {0: 1.0, 1: 1.0, 2: 0.6, 5: 0.6}  # expert -> router bias (the others 0): these win most top-4 picks


def write_skewed(path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    from moeserve.model.synthetic import write_random_checkpoint

    if (path / "config.json").exists():
        return path
    write_random_checkpoint(SKEWED_V3, path, seed=0, std=0.05)
    for file in path.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name in tensors:
            if name.endswith("e_score_correction_bias"):
                bias = torch.zeros_like(tensors[name])
                for e, b in HOT.items():
                    bias[e] = b
                tensors[name] = bias
        save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def rank_load(engine) -> torch.Tensor:
    view = engine.expert_load.flush()
    return view.rank_load("total").sum(0).double()  # [ep] over every MoE layer, since start


def phase(engine, ids: list[list[int]], output_len: int, during=None) -> dict:
    from moeserve.coordinator.sampling import SamplingParams

    before = rank_load(engine)
    engine.stats.step_times.clear()
    if during is not None:
        during()
    start = time.perf_counter()
    engine.generate(ids, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    wall = time.perf_counter() - start
    load = rank_load(engine) - before
    steps = engine.stats.step_times[1:]  # decode steps (the first step is the batch's prefill)
    return {"max_over_mean_rank_load": float(load.max() / load.mean()), "rank_load": load.tolist(),
            "decode_tok_s": len(ids) * len(steps) / sum(steps), "median_step_ms": 1e3 * statistics.median(steps),
            "longest_step_ms": 1e3 * max(steps), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--num-redundant-experts", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", default="", help="where the skewed checkpoint is (or is written)")
    args = parser.parse_args()

    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine

    model = write_skewed(Path(args.checkpoint or tempfile.mkdtemp(prefix="moeserve-skewed-")))
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, SKEWED_V3["vocab_size"], (args.input_len,), generator=gen).tolist()
           for _ in range(args.num_prompts)]
    engine = Engine(EngineConfig(model=str(model), device=args.device, tp=args.ep, ep=args.ep,
                                 num_redundant_experts=args.num_redundant_experts, expert_load_interval=4,
                                 max_num_seqs=len(ids), skip_tokenizer_init=True,
                                 kv_cache_memory=64 << 20))
    try:
        rebalancer = engine.expert_load.rebalancer
        assert rebalancer is not None
        phase(engine, ids, 4)  # warm-up
        static = phase(engine, ids, args.output_len)
        during = phase(engine, ids, args.output_len, during=rebalancer.request)
        after = phase(engine, ids, args.output_len)
        rebalances = [r.__dict__ for r in engine.expert_load.aggregator.rebalances]
        placement = engine.expert_load.aggregator.phy2log
    finally:
        engine.close()
    print(json.dumps({"static": static, "during_rebalance": during, "after": after, "rebalances": rebalances,
                      "placement": None if placement is None else placement.tolist(),
                      "throughput_gain_pct": 100 * (after["decode_tok_s"] / static["decode_tok_s"] - 1),
                      "config": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
