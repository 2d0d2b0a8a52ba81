"""Profile of decode steps on a GPU: kernels per step, GPU busy fraction, and time per kernel class.

Builds the engine on dummy weights of a config (DeepSeek-V2-Lite by default), fills ``batch`` sequences
with ``--input-len``-token prompts, then times ``--steps`` decode steps under the torch profiler (kernels
inside CUDA graphs are traced too) and again without it (the step time reported). ``--mode eager`` runs the
landed eager path (no fused kernels, no graphs) for the "before" column. ``--no-async-scheduling`` runs the
synchronous step (the host's work between two steps leaves the GPU idle) for comparison with the default
async scheduling; ``busy_fraction`` is the GPU's busy time over the step time. Where the rest goes:
``gpu_idle`` splits the GPU's idle time into short gaps (between the kernels of a graph) and long ones (the
GPU waiting for the host), with the longest and the activities around them; ``cuda_api_ms_per_step`` is the
host's time in CUDA runtime calls (a synchronize there is the host waiting for the GPU inside a step);
``--trace-dir`` writes the profiled steps as Chrome traces. Each batch size builds its own engine and
closes it (Engine.close gives the memory back).

    python benchmarks/profile_decode.py --batches 1,64,256 --mode fast --json-out profile.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

CLASSES = [  # (class, pattern over the kernel name), first match wins
    ("moe (fused)", r"_moe_gemm|_gate_up|_down|_combine"), ("router (fused)", r"_route"),
    ("expert count", r"_count"), ("rope (fused)", r"_rope"), ("mla decode (fused)", r"_mla_decode"), ("rmsnorm (fused)", r"_rms_norm"),
    ("attention (sdpa)", r"flash|fmha|attention|softmax"),
    ("matmul", r"gemm|nvjet|cutlass|sm90|xmma|matmul|splitK|Kernel2"),
    ("nccl", r"nccl"), ("copy / index", r"copy|index|gather|scatter|cat|Cat"),
    ("reduce / sort", r"reduce|sort|topk|Topk|radix|scan|cumsum"),
    ("elementwise", r"elementwise|vectorized|unrolled|fill"),
]


def classify(name: str) -> str:
    return next((c for c, pat in CLASSES if re.search(pat, name)), "other")


def hbm_floor_ms(config, batch: int, context: int, bandwidth: float = 4.8e12, dtype_bytes: int = 2,
                 expert_bytes: float = 2.0) -> dict:
    """The memory-bandwidth floor of one decode step: bytes that must be read once (bf16 attention, dense,
    shared-expert and LM-head weights; the routed experts that ``batch`` tokens reach, in expectation under
    uniform routing; the latent cache of ``batch`` x ``context`` tokens) over ``bandwidth`` (H200: 4.8 TB/s).
    ``expert_bytes``: bytes per routed-expert weight (1 for FP8, plus its scales)."""
    h, c = config.hidden_size, config
    heads = c.num_attention_heads
    q = h * heads * c.qk_head_dim if c.q_lora_rank is None else \
        h * c.q_lora_rank + c.q_lora_rank * heads * c.qk_head_dim
    attn = q + h * c.kv_cache_dim + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim) \
        + heads * c.v_head_dim * h
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    dense_layers = c.num_hidden_layers - moe_layers
    expert = 3 * h * c.moe_intermediate_size
    reached = c.n_routed_experts * (1 - (1 - c.num_experts_per_tok / c.n_routed_experts) ** batch)
    weights = dtype_bytes * (c.num_hidden_layers * attn + dense_layers * 3 * h * c.intermediate_size
                             + moe_layers * c.n_shared_experts * expert + c.vocab_size * h) \
        + moe_layers * reached * expert * expert_bytes
    cache = batch * context * c.num_hidden_layers * c.kv_cache_dim * dtype_bytes
    return {"weights_gb": weights / 1e9, "cache_gb": cache / 1e9, "floor_ms": (weights + cache) / bandwidth * 1e3}


def build_engine(model: str, batch: int, mode: str, async_scheduling: bool | None = None,
                 speculative_config: str | None = None):
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine

    cfg = EngineConfig(model=model, device="cuda", load_format="dummy", skip_tokenizer_init=True,
                       max_num_seqs=batch, enforce_eager=mode == "eager", max_model_len=4096,
                       async_scheduling=async_scheduling, speculative_config=speculative_config)
    engine = Engine(cfg)
    if mode == "eager":
        engine.executor.runner.model.use_kernels(False)
    return engine


def fill(engine, batch: int, input_len: int, steps: int) -> None:
    from moeserve.coordinator.sampling import SamplingParams

    gen = torch.Generator().manual_seed(0)
    # as many tokens as the context allows: the first prompts decode while the last ones prefill (8192 tokens
    # a step: 32 steps for 256 x 1024), so a budget counted from the profiled steps alone would let the early
    # requests finish inside the windows and shrink the batch (it did: "batch 256" ran at about 190, then 113)
    params = SamplingParams(max_tokens=engine.max_model_len - input_len, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(0, engine.model_config.vocab_size, (input_len,), generator=gen).tolist()
        engine.add_request(f"p{i}", prompt_token_ids=ids, params=params)
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()


def profile_steps(engine, steps: int, trace: str | None = None) -> dict:
    """Time ``steps`` decode steps, then profile as many. The timed window starts with a step already in
    flight and ends when the last step's outputs are in: with async scheduling each step finishes the batch
    the step before launched, so a window that started on an idle GPU would count the first launch's host
    time as GPU idle."""
    from torch.profiler import ProfilerActivity, profile

    engine.step()
    engine.stats.phase_s = dict.fromkeys(engine.stats.phase_s, 0.0)
    rows = [len(engine.scheduler.running)]
    step_s = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - t)
    step_ms = sum(step_s) / steps * 1e3
    # where the host's time goes per step (EngineStats.phase_s): with async scheduling, all but "wait"
    # overlaps the GPU
    phases = {k: round(v / steps * 1e3, 3) for k, v in engine.stats.phase_s.items()}
    rows.append(len(engine.scheduler.running))
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        profiled_ms = (time.perf_counter() - start) / steps * 1e3
    torch.cuda.synchronize()
    rows.append(len(engine.scheduler.running))
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(trace)
    per_class: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    count = 0
    busy_us = 0.0
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        count += 1
        dur = evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
        busy_us += dur
        per_class[classify(evt.name)] += dur
        per_kernel[evt.name[:80]][0] += dur
        per_kernel[evt.name[:80]][1] += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:12]
    # the GPU's busy time is the profiled window's; the step time is the timed window's (the profiler slows the
    # host): both windows run the same batch (``running_rows``: at the start of each and at the end)
    return {"step_ms": step_ms, "step_ms_median": statistics.median(step_s) * 1e3,
            "step_ms_max": max(step_s) * 1e3, "profiled_step_ms": profiled_ms, "running_rows": rows,
            "host_phase_ms_per_step": phases,
            "kernels_per_step": count / steps, "gpu_busy_ms_per_step": busy_us / steps / 1e3,
            "busy_fraction": busy_us / steps / 1e3 / step_ms,
            "busy_fraction_profiled": busy_us / steps / 1e3 / profiled_ms,
            "ms_per_step_by_class": {k: round(v / steps / 1e3, 3) for k, v in sorted(per_class.items(),
                                                                                key=lambda kv: -kv[1])},
            "top_kernels": [{"name": k, "ms_per_step": round(v[0] / steps / 1e3, 3), "launches_per_step": v[1] / steps}
                            for k, v in top],
            "gpu_idle": idle_gaps(prof.events(), steps), "cuda_api_ms_per_step": cuda_api_time(prof.events(), steps)}


def idle_gaps(events, steps: int, host_gap_us: float = 30.0) -> dict:
    """Where the GPU sits idle between its activities (kernels, copies), per step: in short gaps (the
    launch latency between the kernels of a CUDA graph) or in long ones (>= ``host_gap_us``: the GPU waits
    for the host to queue more work). The longest gaps come with the activities around them."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    short = 0.0
    long: list[tuple[float, str, str]] = []
    end, before = (spans[0][1], spans[0][2]) if spans else (0.0, "")
    for start, stop, name in spans[1:]:
        gap = start - end
        if gap >= host_gap_us:
            long.append((gap, before, name))
        elif gap > 0:
            short += gap
        if stop > end:  # activities may overlap (a copy on another stream): the idle time is past them all
            end, before = stop, name
    long.sort(reverse=True)
    return {"short_gaps_ms_per_step": round(short / steps / 1e3, 3),
            "long_gaps_ms_per_step": round(sum(g for g, _, _ in long) / steps / 1e3, 3),
            "long_gaps_per_step": len(long) / steps,
            "longest": [{"us": round(g, 1), "after": b, "before": a} for g, b, a in long[:6]]}


def cuda_api_time(events, steps: int) -> dict[str, float]:
    """Host time per step in CUDA runtime calls, by name: a stream or event synchronize, a copy from pageable
    memory or a pinned allocation here means the host waited for the device inside a step."""
    per_call: dict[str, float] = defaultdict(float)
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cuda"):
            per_call[e.name] += e.time_range.elapsed_us()
    return {k: round(v / steps / 1e3, 3) for k, v in sorted(per_call.items(), key=lambda kv: -kv[1])[:10]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/configs/deepseek_v2_lite")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mode", choices=["fast", "eager"], default="fast")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="the engine's async scheduling (default: on, as on any CUDA device)")
    p.add_argument("--speculative-config", default=None,
                   help='profile steps that verify MTP drafts, e.g. \'{"method": "mtp", "num_speculative_tokens": 1}\'')
    p.add_argument("--json-out", default=None)
    p.add_argument("--trace-dir", default=None, help="write each batch's profiled steps as a Chrome trace here")
    p.add_argument("--expert-bytes", type=float, default=2.0, help="bytes per routed-expert weight (FP8: 1)")
    args = p.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "mode": args.mode, "model": args.model,
               "async_scheduling": args.async_scheduling, "speculative_config": args.speculative_config, "runs": []}
    for batch in [int(b) for b in args.batches.split(",")]:
        start = time.perf_counter()
        engine = build_engine(args.model, batch, args.mode, args.async_scheduling, args.speculative_config)
        build_s = time.perf_counter() - start
        fill(engine, batch, args.input_len, args.steps)
        floor = hbm_floor_ms(engine.model_config, batch, args.input_len, expert_bytes=args.expert_bytes)
        run = {"batch": batch, "build_s": build_s, "async_scheduling": engine.async_scheduling,
               "fast_path_error": engine.executor.runner.fast_path_error,
               "graphs": engine.executor.runner.graphs is not None,
               **profile_steps(engine, args.steps, args.trace_dir and f"{args.trace_dir}/decode_{batch}.json"),
               "hbm_floor": floor}
        run["fraction_of_floor"] = floor["floor_ms"] / run["step_ms"]
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        engine.close()
        del engine
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
