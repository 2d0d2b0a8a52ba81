"""The vLLM side of benchmarks/bench_cpu.py; runs inside vLLM's own virtual environment (not moeserve's).

Prints one JSON line: {"elapsed_s": ..., "tokens": [[...], ...], "allocator": ..., "openmp": ...} (the malloc
vLLM's CPU platform preloaded into its engine process, if any: it does where its wheel bundles tcmalloc; and the
OpenMP runtime mapped, read here rather than through moeserve.cpu_runtime, which vLLM's venv does not have).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", default="vllm")
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    gen = torch.Generator().manual_seed(1234)  # the same prompts as bench_cpu.prompts()
    vocab = json.load(open(f"{args.model}/config.json"))["vocab_size"]
    ids = torch.randint(2, vocab, (args.num_prompts, args.input_len), generator=gen).tolist()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.input_len + args.output_len + 16,
              max_num_seqs=args.num_prompts, enforce_eager=False)
    params = SamplingParams(max_tokens=args.output_len, min_tokens=args.output_len, temperature=0.0,
                            ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    preload = os.environ.get("LD_PRELOAD", "")
    allocator = next((name for name in ("tcmalloc", "jemalloc") if name in preload), "system")
    with open("/proc/self/maps") as maps:  # the OpenMP runtime mapped first takes the GNU entry points
        openmp = "intel" if "libiomp5" in maps.read() else "gnu"
    print(json.dumps({"elapsed_s": elapsed, "tokens": [list(o.outputs[0].token_ids) for o in outs],
                      "allocator": allocator, "openmp": openmp}))


if __name__ == "__main__":
    main()
