"""MLA prefill attention: the flash-attention kernel (kernels/mla_prefill.py) against the eager SDPA path.

One MLA layer at DeepSeek-V2-Lite's shapes (16 heads, nope 128 + rope 64, v 128, kv_lora_rank 512; random
weights, bf16) on a paged latent cache. For each step shape it times ``MLA._prefill`` -- the context's
gather from the cache, its up-projection by kv_b_proj and the attention -- eagerly (padded, SDPA under a
dense mask) and with the kernel, the metadata each path builds (once per step, shared by the layers), and
the kernel alone under a few tile configurations; it asserts that the two outputs agree (relative L2).
Steps: 8k new tokens as 1 and as 8 sequences, and one 32k prompt in four 8k chunks (each over the cached
prefix of the chunks before it). GPU only:

    python benchmarks/bench_mla_prefill.py            # the table
    python benchmarks/bench_mla_prefill.py --configs 128,64,8,2 128,64,8,3 64,64,4,2 128,128,8,2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from moeserve.kernels.mla_prefill import mla_prefill
from moeserve.model.attn_metadata import PrefillMetadata, build_attn_metadata
from moeserve.model.config import ModelConfig
from moeserve.model.layers import RotaryEmbedding
from moeserve.model.mla import MLA

CONFIG = Path(__file__).resolve().parent / "configs" / "deepseek_v2_lite"
BLOCK_SIZE = 64


def make_layer(dtype: torch.dtype, device: torch.device, max_positions: int) -> MLA:
    config = ModelConfig.from_hf(CONFIG)
    mla = MLA(config, RotaryEmbedding(config.rope, config.qk_rope_head_dim, max_positions), dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for p in mla.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * (0.02 if p.dim() > 1 else 1.0))
    return mla.to(device)


def steps_of(step_tokens: int, long_prompt: int) -> dict[str, list[tuple[list[int], list[int]]]]:
    """name -> its steps, each (num_computed, query_lens) per sequence."""
    chunks = [([done], [step_tokens]) for done in range(0, long_prompt, step_tokens)]
    return {f"1 x {step_tokens}": [([0], [step_tokens])],
            f"8 x {step_tokens // 8}": [([0] * 8, [step_tokens // 8] * 8)],
            f"{long_prompt} in {len(chunks)} chunks": chunks}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def causal_flops(mla: MLA, prefill: PrefillMetadata) -> float:
    """Multiply-adds x 2 of QK^T and PV over the visible (causal) pairs."""
    computed, q_lens = prefill.num_computed.tolist(), prefill.query_start.diff().tolist()
    pairs = sum(q * p + q * (q + 1) // 2 for p, q in zip(computed, q_lens))
    return 2.0 * pairs * mla.num_heads * (mla.nope_dim + mla.rope_dim + mla.v_dim)


@torch.inference_mode()
def run_step(mla: MLA, cache: torch.Tensor, computed: list[int], q_lens: list[int], args, device
             ) -> tuple[dict[str, float], float]:
    """-> (milliseconds by column, rel L2 of the kernel's output against the eager one) for one step."""
    num_seqs, blocks = len(q_lens), -(-(max(computed) + max(q_lens)) // BLOCK_SIZE)
    tables = torch.arange(num_seqs * blocks, device=device).view(num_seqs, blocks)
    meta = build_attn_metadata(tables, torch.tensor(computed, device=device), torch.tensor(q_lens, device=device),
                               BLOCK_SIZE)
    assert meta.prefill is not None
    num_tokens = sum(q_lens)
    gen = torch.Generator(device=device).manual_seed(1)
    q_nope = torch.randn(num_tokens, mla.num_heads, mla.nope_dim, device=device, dtype=cache.dtype, generator=gen)
    q_pe = torch.randn(num_tokens, mla.num_heads, mla.rope_dim, device=device, dtype=cache.dtype, generator=gen)
    outs = {}
    ms: dict[str, float] = {}
    for name, fused in (("eager", False), ("kernel", True)):
        mla.fused = fused
        out = q_nope.new_empty(num_tokens, mla.num_heads, mla.v_dim)
        ms[name] = timed(lambda out=out: mla._prefill(q_nope, q_pe, cache, meta, out), device, args.repeats)
        outs[name] = out.float()
    prefill = meta.prefill
    # each path's own metadata, built afresh (a copy of the fields holds none of the cached forms)
    ms["meta eager"] = timed(lambda: dataclasses.replace(prefill).padded, device, args.repeats)
    ms["meta kernel"] = timed(lambda: dataclasses.replace(prefill).context_rows, device, args.repeats)
    k_nope, k_pe, v = mla._up_project(cache[prefill.context_rows])
    flops = causal_flops(mla, prefill)
    for config in args.configs:
        tiles = tuple(int(x) for x in config.split(","))
        ms[f"kernel {config}"] = timed(lambda tiles=tiles: mla_prefill(
            q_nope, q_pe, k_nope, k_pe, v, prefill.query_start, prefill.context_start, prefill.max_query_len,
            mla.scale, config=tiles), device, args.repeats)
        ms[f"TFLOPS {config}"] = flops / ms[f"kernel {config}"] / 1e9
    err = float((outs["kernel"] - outs["eager"]).norm() / outs["eager"].norm())
    return ms, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--step-tokens", type=int, default=8192)
    parser.add_argument("--long-prompt", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--configs", nargs="*", default=["128,64,8,2", "128,64,8,3", "64,64,4,2"],
                        help="kernel tiles BLOCK_M,BLOCK_N,num_warps,num_stages to time alone")
    parser.add_argument("--max-rel-err", type=float, default=2e-2)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    mla = make_layer(dtype, device, args.long_prompt + args.step_tokens)
    num_slots = (args.long_prompt + 8 * BLOCK_SIZE) * 2
    cache = torch.randn(num_slots, mla.kv_lora_rank + mla.rope_dim, dtype=dtype, device=device)
    print(f"MLA prefill, one layer, V2-Lite shapes ({mla.num_heads} heads), {args.dtype}, {device}; ms per step")
    print(f"{'step':<24}{'eager':>9}{'kernel':>9}{'speed-up':>9}{'meta eager':>11}{'meta kern':>10}  "
          f"kernel alone (ms / TFLOPS) by tiles{'':<4}rel L2")
    for name, steps in steps_of(args.step_tokens, args.long_prompt).items():
        for k, (computed, q_lens) in enumerate(steps):
            ms, err = run_step(mla, cache, computed, q_lens, args, device)
            label = name if len(steps) == 1 else f"{name} [{k + 1}]"
            alone = "  ".join(f"{c}: {ms[f'kernel {c}']:.2f}/{ms[f'TFLOPS {c}']:.0f}" for c in args.configs)
            print(f"{label:<24}{ms['eager']:>9.2f}{ms['kernel']:>9.2f}{ms['eager'] / ms['kernel']:>8.1f}x"
                  f"{ms['meta eager']:>11.2f}{ms['meta kernel']:>10.2f}  {alone}  {err:.1e}")
            assert err < args.max_rel_err, f"{label}: the kernel differs from the eager path by {err:.2e}"


if __name__ == "__main__":
    main()
