"""The routed-expert kernels on one GPU, at the shapes of DeepSeek-V2-Lite (bf16) and V3 (FP8 experts).

1. ``sweep``: tiles and splits of the small-batch split-K kernel (``kernels/moe_gemv.py``), each launch
   tuned with the other at its default; bandwidth over the bytes of the experts the pairs reach.
2. ``paths``: split-K matrix-vector vs the sorted tensor-core GEMM (``fused_moe_sorted``) vs the eager
   grouped GEMM (FP8: dequantize + grouped GEMM), by token count: where each wins.
3. ``count``: what counting a step's routed pairs costs, eager ops vs the one-launch kernel, 26 layers.
4. ``sorted``: tiles and pipeline stages of the sorted tensor-core GEMM (``fused_moe_sorted``) at the token
   counts of ``--sorted-tokens``, against today's tiles and the split-K kernel (tuned tiles).
5. ``shared``: bf16 shapes only: the shared experts as extra pairs of the split-K kernel against the routed
   kernel followed by the shared MLP's own GEMMs (two cuBLAS GEMMs, the activation and the add), by tokens.

Every timing replays a CUDA graph of one call per layer over ``--layers`` copies of the weights (more bytes
than the L2 holds), median of ``triton.testing.do_bench``; the device-to-device copy bandwidth is measured
first and each kernel is reported against it.

    python benchmarks/bench_moe_kernels.py --json-out moe_kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton

from moeserve.kernels.fused_moe import GemmConfig, fused_moe_sorted, gemm_config
from moeserve.kernels.moe_gemv import (
    GemvConfig,
    SharedWeights,
    gemv_configs,
    moe_gemv,
)
from moeserve.model.fp8 import FP8_DTYPE

SHAPES = {  # name: (experts, hidden, moe_intermediate, top_k, fp8, layers)
    "v2lite": (64, 2048, 1408, 6, False, 3),
    "v3": (256, 7168, 2048, 8, True, 2),
}
SHARED_EXPERTS = {"v2lite": 2, "v3": 1}


def graph_ms(fn, calls: int, rep: int = 100) -> float:
    """Median ms of one call of ``fn(i)`` for i in range(calls), replayed from one CUDA graph."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    return triton.testing.do_bench(graph.replay, warmup=20, rep=rep, return_mode="median") / calls


def copy_bandwidth() -> float:
    """Bytes per second of a 4 GiB device-to-device copy, counting bytes read and written."""
    a = torch.empty(1 << 31, dtype=torch.int16, device="cuda").random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=20, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3)


class Experts:
    def __init__(self, shape: str):
        self.shape = shape
        self.num, self.hidden, self.inter, self.top_k, self.fp8, self.layers = SHAPES[shape]
        gen = torch.Generator(device="cuda").manual_seed(0)
        dtype = FP8_DTYPE if self.fp8 else torch.bfloat16
        self.w13, self.w2, self.s13, self.s2 = [], [], [], []
        for _ in range(self.layers):
            w13 = torch.randn(self.num, 2 * self.inter, self.hidden, device="cuda", generator=gen,
                              dtype=torch.bfloat16) / self.hidden ** 0.5
            self.w13.append(w13.to(dtype))
            del w13
            w2 = torch.randn(self.num, self.hidden, self.inter, device="cuda", generator=gen,
                             dtype=torch.bfloat16) / self.inter ** 0.5
            self.w2.append(w2.to(dtype))
            del w2
            if self.fp8:
                self.s13.append(torch.rand(self.num, 2, self.inter // 128, self.hidden // 128, device="cuda") + .5)
                self.s2.append(torch.rand(self.num, self.hidden // 128, self.inter // 128, device="cuda") + .5)
        self.bytes_per_expert = 3 * self.hidden * self.inter * (1 if self.fp8 else 2)

    def case(self, tokens: int, seed: int = 1):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(tokens, self.hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        ids = torch.rand(tokens, self.num, device="cuda", generator=gen).topk(self.top_k, -1).indices
        weights = torch.rand(tokens, self.top_k, device="cuda", generator=gen)
        return x, weights, ids

    def scales(self, i: int):
        return (self.s13[i], self.s2[i]) if self.fp8 else (None, None)

    def reached_bytes(self, ids: torch.Tensor) -> int:
        return int(ids.unique().numel()) * self.bytes_per_expert


def run_gemv(ex: Experts, tokens: int, cfg1: GemvConfig, cfg2: GemvConfig) -> float:
    x, weights, ids = ex.case(tokens)
    local = ids.flatten()
    return graph_ms(lambda i: moe_gemv(x, ex.w13[i], ex.w2[i], weights, local, ex.num, *ex.scales(i),
                                       gate_up=cfg1, down=cfg2), ex.layers)


# (a tile of more than 16k weights is past the registers of 4-8 warps once converted to float32)
CANDIDATES = [GemvConfig(bn, bk, sk, w) for bn in (16, 32, 64) for bk in (128, 256, 512) for sk in (1, 2, 4)
              for w in (4, 8) if bn * bk <= 16384]


def sweep(ex: Experts, tokens: int, bandwidth: float) -> dict:
    """Tune the gate/up launch with the down launch at its default, then the down launch."""
    _, _, ids = ex.case(tokens)
    reached = ex.reached_bytes(ids)
    rows = []
    gate_up, down = gemv_configs(tokens * ex.top_k, ex.fp8)  # what moe_gemv runs today
    best1 = min(CANDIDATES, key=lambda c: run_gemv(ex, tokens, c, down))
    best2 = min(CANDIDATES, key=lambda c: run_gemv(ex, tokens, best1, c))
    for name, c1, c2 in (("default", gate_up, down), ("tuned", best1, best2)):
        ms = run_gemv(ex, tokens, c1, c2)
        rows.append({"config": name, "gate_up": vars(c1), "down": vars(c2), "ms": ms,
                     "gb_s": reached / ms / 1e6, "of_copy_bw": reached / (ms * 1e-3) / bandwidth})
    return {"tokens": tokens, "pairs": tokens * ex.top_k, "reached_mb": reached / 1e6, "rows": rows}


SORTED_CANDIDATES = [GemmConfig(bm, bn, 128, w, st) for bm in (16, 32) for bn in (64, 128) for w in (4, 8)
                     for st in (3, 4, 5)] \
    + [GemmConfig(64, bn, bk, 8, st) for bn in (64, 128) for bk in (64, 128) for st in (2, 3, 4)]  # many pairs


def sorted_sweep(ex: Experts, tokens: int, bandwidth: float) -> dict:
    """Every candidate tile of the sorted GEMM at ``tokens`` tokens; the best against today's choice."""
    x, weights, ids = ex.case(tokens)
    local = ids.flatten()
    reached = ex.reached_bytes(ids)

    def run(cfg: GemmConfig) -> float:
        return graph_ms(lambda i: fused_moe_sorted(x, ex.w13[i], ex.w2[i], weights, local, ex.num, *ex.scales(i),
                                                   config=cfg), ex.layers, rep=50)
    timed = []
    for cfg in SORTED_CANDIDATES:
        try:
            timed.append((run(cfg), cfg))
        except Exception as e:  # a tile the GPU cannot hold (shared memory): not a candidate here
            print(f"# {cfg}: {type(e).__name__}", file=sys.stderr)
    best_ms, best = min(timed, key=lambda t: t[0])
    today = gemm_config(local.numel(), ex.fp8)
    row = {"tokens": tokens, "pairs": local.numel(), "reached_mb": reached / 1e6, "today": vars(today),
           "today_ms": run(today), "best": vars(best), "best_ms": best_ms,
           "best_of_copy_bw": reached / (best_ms * 1e-3) / bandwidth,
           "top5": [(round(ms, 4), vars(c)) for ms, c in sorted(timed, key=lambda t: t[0])[:5]]}
    if local.numel() <= 512:
        cfg1, cfg2 = gemv_configs(tokens * ex.top_k, ex.fp8)
        row["gemv_ms"] = run_gemv(ex, tokens, cfg1, cfg2)
    print(json.dumps(row), flush=True)
    return row


def path_row(ex: Experts, tokens: int, moe_layer) -> dict:
    x, weights, ids = ex.case(tokens)
    local = ids.flatten()
    row = {"tokens": tokens, "pairs": local.numel(), "reached_mb": ex.reached_bytes(ids) / 1e6}
    if local.numel() <= 512:
        row["gemv_ms"] = graph_ms(lambda i: moe_gemv(x, ex.w13[i], ex.w2[i], weights, local, ex.num,
                                                     *ex.scales(i)), ex.layers)
    row["sorted_ms"] = graph_ms(lambda i: fused_moe_sorted(x, ex.w13[i], ex.w2[i], weights, local, ex.num,
                                                           *ex.scales(i)), ex.layers)

    def eager(i):
        moe_layer.w13, moe_layer.w2 = ex.w13[i], ex.w2[i]
        if ex.fp8:
            moe_layer.w13_scale_inv, moe_layer.w2_scale_inv = ex.scales(i)
        return moe_layer.routed_grouped(x, weights, ids)
    row["eager_ms"] = graph_ms(eager, ex.layers)
    print(json.dumps(row), flush=True)
    return row


def shared_row(ex: Experts, tokens: int, bandwidth: float) -> dict:
    """The routed kernel then the shared MLP apart, against the shared experts inside the kernel."""
    import torch.nn.functional as F

    width = SHARED_EXPERTS[ex.shape] * ex.inter
    gen = torch.Generator(device="cuda").manual_seed(2)
    shared = [SharedWeights(torch.randn(2 * width, ex.hidden, device="cuda", generator=gen).bfloat16(),
                            torch.randn(ex.hidden, width, device="cuda", generator=gen).bfloat16())
              for _ in range(ex.layers)]
    x, weights, ids = ex.case(tokens)
    local = ids.flatten()

    def apart(i):
        routed = moe_gemv(x, ex.w13[i], ex.w2[i], weights, local, ex.num)
        gate, up = F.linear(x, shared[i].gate_up).chunk(2, -1)
        return routed + F.linear(F.silu(gate) * up, shared[i].down)

    row = {"tokens": tokens, "apart_ms": graph_ms(apart, ex.layers),
           "in_kernel_ms": graph_ms(lambda i: moe_gemv(x, ex.w13[i], ex.w2[i], weights, local, ex.num,
                                                       shared=shared[i]), ex.layers)}
    reached = ex.reached_bytes(ids) + 3 * width * ex.hidden * 2
    row["in_kernel_of_copy_bw"] = reached / (row["in_kernel_ms"] * 1e-3) / bandwidth
    print(json.dumps(row), flush=True)
    return row


def eager_layer(ex: Experts):
    """A MoE layer whose weights ``paths`` swaps in, for the eager grouped GEMM (with its dequantize)."""
    from moeserve.experts.moe import MoE
    from moeserve.model.config import ModelConfig

    base = {"model_type": "deepseek_v3", "hidden_size": ex.hidden, "moe_intermediate_size": ex.inter, "n_routed_experts": ex.num,
            "num_experts_per_tok": ex.top_k, "intermediate_size": 4 * ex.hidden, "vocab_size": 1024,
            "num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 128, "q_lora_rank": None,
            "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "n_shared_experts": 0}
    config = ModelConfig.from_dict(base)
    moe = MoE(config, dtype=torch.bfloat16, fp8_block=(128, 128) if ex.fp8 else None).to("cuda")
    del moe.w13, moe.w2  # plain attributes from here on: ``paths`` swaps each layer's in
    if ex.fp8:
        del moe.w13_scale_inv, moe.w2_scale_inv
    return moe


def count_row(tokens: int, layers: int = 26, top_k: int = 6, num_experts: int = 64) -> dict:
    """Counting one decode step's pairs in ``layers`` MoE layers (V2-Lite's 26), eager vs one launch."""
    from moeserve.experts.load_counter import ExpertLoadCounter, count_routed

    ids = torch.randint(0, num_experts, (tokens, top_k), device="cuda")
    weights = torch.ones(tokens, dtype=torch.long, device="cuda")
    row: dict = {"tokens": tokens, "layers": layers}
    for fused in (False, True):
        counter = ExpertLoadCounter(range(layers), num_experts, torch.device("cuda"), fused=fused)
        counter.begin_step(tokens)
        ms = graph_ms(lambda i, c=counter: count_routed(c, i, ids, weights=weights), layers)
        row["fused_us" if fused else "eager_us"] = ms * 1e3 * layers
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="v2lite,v3")
    parser.add_argument("--parts", default="sweep,paths,count")
    parser.add_argument("--sweep-tokens", help="token counts the sweep tunes at (default: 1,8 for bf16 "
                        "shapes, 1,4,8 for FP8), e.g. 32 for V3's batch-32 step")
    parser.add_argument("--sorted-tokens", default="16,32,64", help="token counts the sorted sweep runs at")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    parts = args.parts.split(",")
    result: dict = {"device": torch.cuda.get_device_name(), "copy_bw_gb_s": copy_bandwidth() / 1e9}
    print(json.dumps(result), flush=True)
    for shape in args.shapes.split(","):
        ex = Experts(shape)
        small = [int(t) for t in args.sweep_tokens.split(",")] if args.sweep_tokens else \
            (1, 8) if shape == "v2lite" else (1, 4, 8)
        if "sweep" in parts:
            result[f"{shape}_sweep"] = [sweep(ex, t, result["copy_bw_gb_s"] * 1e9) for t in small]
            print(json.dumps(result[f"{shape}_sweep"]), flush=True)
        if "paths" in parts:
            counts = [1, 2, 4, 8, 11, 16, 32, 64, 256, 2048, 8192] if shape == "v2lite" else \
                [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192]
            layer = eager_layer(ex)
            result[f"{shape}_paths"] = [path_row(ex, t, layer) for t in counts]
        if "sorted" in parts:
            result[f"{shape}_sorted"] = [sorted_sweep(ex, int(t), result["copy_bw_gb_s"] * 1e9)
                                         for t in args.sorted_tokens.split(",")]
        if "shared" in parts and not ex.fp8:
            result[f"{shape}_shared"] = [shared_row(ex, t, result["copy_bw_gb_s"] * 1e9) for t in (1, 2, 4, 8, 10)]
        del ex
        torch.cuda.empty_cache()
    if "count" in parts:
        result["count"] = [count_row(t) for t in (1, 64, 256)]
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
