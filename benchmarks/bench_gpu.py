"""GPU decode benchmark: a DeepSeek-V2-Lite-shaped model with random bf16 weights, moeserve vs HF transformers.

Both run the SAME weights: the HF model is built with random init on the GPU and moeserve's model aliases its
tensors (HF keeps experts fused as [E, 2I, H] / [E, H, I], which is moeserve's layout), so the greedy tokens
can be compared too. Nothing is downloaded or written to disk.

    PYTHONPATH=. python benchmarks/bench_gpu.py --batches 1,16,64 --prompt-len 128 --decode-steps 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

DEVICE = "cuda"

V2_LITE = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6,
    "n_group": 1, "topk_group": 1, "topk_method": "greedy", "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "rope_theta": 10000, "tie_word_embeddings": False,
    "bos_token_id": 100000, "eos_token_id": 100001, "scoring_func": "softmax", "initializer_range": 0.02,
}


def build_hf(raw: dict, layers: int):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(**{k: v for k, v in raw.items() if k not in ("model_type", "scoring_func")})
    cfg.num_hidden_layers = layers
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = DeepseekV2ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return model.eval().requires_grad_(False)


def _set(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)


def alias_into_moeserve(hf, raw: dict, layers: int):
    """moeserve's model over the HF model's tensors (copies only where the layouts differ: gate/up fusion).

    The model is built on the meta device, so nothing is allocated twice; parameters are then replaced.
    """
    from moeserve.model.config import ModelConfig
    from moeserve.model.deepseek import DeepseekModel
    from moeserve.model.layers import RotaryEmbedding

    config = ModelConfig.from_dict(dict(raw, num_hidden_layers=layers))
    with torch.device("meta"):
        ours = DeepseekModel(config, dtype=torch.bfloat16, max_positions=config.max_position_embeddings)
    rot = RotaryEmbedding(config.rope, config.qk_rope_head_dim, config.max_position_embeddings).to(DEVICE)
    hm = hf.model
    _set(ours, "embed_tokens", hm.embed_tokens.weight.data)
    _set(ours.norm, "weight", hm.norm.weight.data)
    _set(ours, "lm_head", hf.lm_head.weight.data)
    ours.rotary = rot
    for i, layer in ours.layers.items():
        src = hm.layers[int(i)]
        layer.self_attn.rotary = rot
        _set(layer.input_layernorm, "weight", src.input_layernorm.weight.data)
        _set(layer.post_attention_layernorm, "weight", src.post_attention_layernorm.weight.data)
        a, sa = layer.self_attn, src.self_attn
        for name in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            _set(a, name, getattr(sa, name).weight.data)
        _set(a.kv_a_layernorm, "weight", sa.kv_a_layernorm.weight.data)
        _alias_mlp(layer.mlp, src.mlp)
    return ours


def _fuse(dst, src) -> None:
    _set(dst, "gate_up_proj", torch.cat([src.gate_proj.weight.data, src.up_proj.weight.data], 0))
    _set(dst, "down_proj", src.down_proj.weight.data)


def _alias_mlp(dst, src) -> None:
    if not hasattr(src, "experts"):
        _fuse(dst, src)
        return
    _set(dst, "gate_weight", src.gate.weight.data.float())
    experts = src.experts
    if hasattr(experts, "gate_up_proj"):
        _set(dst, "w13", experts.gate_up_proj.data)
        _set(dst, "w2", experts.down_proj.data)
    else:  # older transformers: a ModuleList of MLPs
        _set(dst, "w13", torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight], 0) for e in experts]))
        _set(dst, "w2", torch.stack([e.down_proj.weight for e in experts]))
    dst.expert_map.to(DEVICE)
    dst.tokens_per_expert = torch.zeros(dst.spec.num_experts, dtype=torch.long, device=DEVICE)
    _fuse(dst.shared_experts, src.shared_experts)


def bench_moeserve(model, batch: int, prompts: torch.Tensor, steps: int) -> tuple[float, list[list[int]]]:
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine
    from moeserve.coordinator.sampling import SamplingParams

    cfg = EngineConfig(device=DEVICE, dtype="bfloat16", kv_cache_memory=4 << 30, max_num_seqs=max(batch, 1),
                       max_num_batched_tokens=max(2048, batch * prompts.shape[1]), skip_tokenizer_init=True)
    engine = Engine(cfg, model=model)
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for b in range(batch):
        engine.add_request(f"r{b}", prompt_token_ids=prompts[b].tolist(), params=params)
    tokens: dict[str, list[int]] = {f"r{b}": [] for b in range(batch)}
    while any(not t for t in tokens.values()):  # prefill: every request gets its first token
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    _sync()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    _sync()
    elapsed = time.perf_counter() - t0
    return batch * steps / elapsed, [tokens[f"r{b}"] for b in range(batch)]


@torch.no_grad()
def bench_hf(hf, prompts: torch.Tensor, steps: int) -> tuple[float, list[list[int]], torch.Tensor]:
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    out = hf(prompts, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    all_logits, toks = [out.logits[:, -1].float()], [tok]
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = hf(tok, past_key_values=out.past_key_values, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
        all_logits.append(out.logits[:, -1].float())
    _sync()
    elapsed = time.perf_counter() - t0
    return prompts.shape[0] * steps / elapsed, torch.cat(toks, 1).tolist(), torch.stack(all_logits, 1)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def first_divergence(a: list[int], b: list[int], ref_logits: torch.Tensor) -> dict:
    """Where two greedy streams part, and the reference's top-2 logit gap there (a near tie vs a bug)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            top2 = ref_logits[i].topk(2).values
            return {"position": i, "top2_gap": float(top2[0] - top2[1])}
    return {"position": None, "top2_gap": None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--layers", type=int, default=V2_LITE["num_hidden_layers"])
    p.add_argument("--json-out", default=None)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of the script)")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.manual_seed(0)
    hf = build_hf(V2_LITE, args.layers)
    params = sum(t.numel() for t in hf.parameters())
    ours = alias_into_moeserve(hf, V2_LITE, args.layers)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    results = {"params": params, "gpu": gpu, "layers": args.layers, "prompt_len": args.prompt_len,
               "decode_steps": args.decode_steps, "runs": []}
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(0, V2_LITE["vocab_size"], (batch, args.prompt_len), device=DEVICE)
        ours_tps, ours_tokens = bench_moeserve(ours, batch, prompts, args.decode_steps)
        hf_tps, hf_tokens, hf_logits = bench_hf(hf, prompts, args.decode_steps)
        div = [first_divergence(o, h, hf_logits[i]) for i, (o, h) in enumerate(zip(ours_tokens, hf_tokens))]
        run = {"batch": batch, "moeserve_tok_s": ours_tps, "hf_tok_s": hf_tps, "ratio": ours_tps / hf_tps,
               "identical_sequences": sum(d["position"] is None for d in div), "divergences": div[:8]}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    if DEVICE == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
