"""Parallel layouts against one device: same greedy tokens (or a near tie explained), and decode throughput.

Each layout (pp x tp x ep) runs in its own process on dummy weights made from a config.json alone
(``--load-format dummy``: every layout holds the same model). Per layout:
  1. correctness: ``--check-prompts`` random prompts decoded greedily for ``--check-tokens`` tokens, with the
     top-2 logit gap and the top logit at every step;
  2. throughput: ``moeserve bench``'s run (``--batch`` prompts of ``--input-len`` at once, ``--output-len``
     new tokens): output tokens/s, decode tokens/s (batch / median inter-token latency), TTFT, per-stage busy
     fraction, and memory per GPU (nvidia-smi while the engine is up).
Then each layout's tokens are compared with the first layout's: where they first differ, the reference's
top-2 gap is shown beside bf16's rounding at that logit (2 * 2^-8 * |top logit|): a gap below it is a near
tie that a different reduction order may flip; a gap far above it would be a bug.

    PYTHONPATH=. python benchmarks/bench_layouts.py --config benchmarks/configs/deepseek_v2_lite \\
        --layouts 1x1x1,2x1x1,1x2x2 --batch 64 --json-out benchmarks/results/layouts.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

BF16_UNIT_ROUNDOFF = 2.0 ** -8


def cut_config(src: Path, num_layers: int, dst: Path) -> Path:
    raw = json.loads((src / "config.json").read_text())
    if num_layers:
        raw["num_hidden_layers"] = num_layers
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(raw, indent=1))
    return dst


def gpu_memory_used() -> list[int]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return [int(x) * 2**20 for x in out.split()]
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return []


def record_top2(engine):
    """Wrap the engine's sampler so that every sampled row's (top-2 gap, top logit) is kept per request.
    Returns (the record, a function that removes the wrapping).

    Batches are sampled and processed in the same order (with async scheduling a batch is sampled before
    the one before it is processed), so the rows of each sampling wait in a queue for their processing; a
    row whose request had already finished (its extra token, discarded) is not kept."""
    stash: deque[list[tuple[float, float]]] = deque()
    record: dict[str, list[tuple[float, float]]] = {}
    sample, process = engine.sampler.sample, engine._process

    def sample_and_keep(logits, batch):
        top2 = logits.float().topk(2, dim=-1).values
        stash.append(list(zip((top2[:, 0] - top2[:, 1]).tolist(), top2[:, 0].tolist())))
        return sample(logits, batch)

    def process_and_keep(reqs, host):
        for req, row in zip(reqs, stash.popleft()):
            if not req.is_finished:
                record.setdefault(req.request_id, []).append(row)
        return process(reqs, host)

    engine.sampler.sample, engine._process = sample_and_keep, process_and_keep

    def restore() -> None:
        del engine.sampler.sample, engine._process  # the instance attributes; the methods show again

    return record, restore


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine
    from moeserve.coordinator.sampling import SamplingParams
    from moeserve.launch.cmd_bench import run_benchmark

    pp, tp, ep = (int(x) for x in args.run_one.split("x"))
    start = time.perf_counter()
    engine = Engine(EngineConfig(model=str(args.model_dir), device=args.device, dtype=args.dtype, load_format="dummy",
                                 skip_tokenizer_init=True, pp=pp, tp=tp, ep=ep, max_num_seqs=max(args.batch, 8),
                                 max_num_batched_tokens=args.max_batched_tokens,
                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                 kv_cache_memory=args.kv_cache_memory, seed=args.seed))
    load_s = time.perf_counter() - start
    try:
        gen = torch.Generator().manual_seed(1)
        vocab = engine.model_config.vocab_size
        prompts = [torch.randint(0, vocab, (args.check_prompt_len,), generator=gen).tolist()
                   for _ in range(args.check_prompts)]
        record, restore = record_top2(engine)
        outs = engine.generate(prompts, SamplingParams(max_tokens=args.check_tokens, temperature=0.0,
                                                       ignore_eos=True))
        restore()
        check = [{"tokens": o.output_token_ids, "top2": record[o.request_id]} for o in outs]
        bench = run_benchmark(engine, args.batch, args.input_len, args.output_len, progress=False)
        memory = gpu_memory_used() if args.device != "cpu" else []
    finally:
        engine.close()
    bench["decode_tokens_per_s"] = args.batch / bench["itl_p50_s"]
    return {"layout": {"pp": pp, "tp": tp, "ep": ep}, "load_s": load_s, "check": check, "bench": bench,
            "gpu_memory_used_bytes": memory, "num_blocks": engine.kv.num_blocks}


def first_divergence(ref: dict, other: dict) -> dict:
    """The first position where two greedy streams differ, with the reference's top-2 gap there and bf16's
    rounding at that logit."""
    for i, (a, b) in enumerate(zip(ref["tokens"], other["tokens"])):
        if a != b:
            gap, top = ref["top2"][i]
            rounding = 2 * BF16_UNIT_ROUNDOFF * abs(top)
            return {"position": i, "top2_gap": gap, "bf16_rounding": rounding, "near_tie": gap < rounding}
    return {"position": None}


def compare(results: list[dict]) -> list[dict]:
    ref = results[0]
    rows = []
    for res in results[1:]:
        divs = [first_divergence(a, b) for a, b in zip(ref["check"], res["check"])]
        differ = [d for d in divs if d["position"] is not None]
        rows.append({"layout": res["layout"], "prompts_identical": len(divs) - len(differ),
                     "prompts": len(divs), "divergences": differ,
                     "all_explained_by_near_ties": all(d["near_tie"] for d in differ),
                     "min_top2_gap_before_divergence": min(
                         (g for c, d in zip(ref["check"], divs)
                          for g, _ in c["top2"][:d["position"] if d["position"] is not None else None]),
                         default=math.nan)})
    return rows


def print_summary(results: list[dict], rows: list[dict]) -> None:
    base = results[0]["bench"]["decode_tokens_per_s"]
    print(f"{'layout':<10} {'decode tok/s':>12} {'vs first':>8} {'output tok/s':>12} {'TTFT p50':>9} "
          f"{'ITL p50':>8}  stage busy")
    for res in results:
        b, lay = res["bench"], res["layout"]
        busy = " ".join(f"{s['busy_fraction'] * 100:.0f}%" for s in b.get("stage_busy", []))
        busy += "  engine: " + " ".join(f"{k} {v * 100:.0f}%" for k, v in b["engine_phase_fraction"].items())
        print(f"{lay['pp']}x{lay['tp']}x{lay['ep']:<6} {b['decode_tokens_per_s']:>12.1f} "
              f"{b['decode_tokens_per_s'] / base:>7.2f}x {b['output_tokens_per_s']:>12.1f} "
              f"{b['ttft_p50_s'] * 1e3:>7.0f}ms {b['itl_p50_s'] * 1e3:>6.1f}ms  {busy}")
    for row in rows:
        lay = row["layout"]
        print(f"tokens {lay['pp']}x{lay['tp']}x{lay['ep']} vs first: {row['prompts_identical']}/{row['prompts']} "
              f"prompts identical; divergences: "
              + ("; ".join(f"pos {d['position']} gap {d['top2_gap']:.4f} (bf16 rounding {d['bf16_rounding']:.4f})"
                           for d in row["divergences"]) or "none"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True, help="directory with config.json")
    p.add_argument("--num-layers", type=int, default=0, help="cut the model to its first N layers")
    p.add_argument("--layouts", default="1x1x1,2x1x1,1x2x2", help="pp x tp x ep, the first is the reference")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPUs), float32: a check without bf16 rounding")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--check-prompts", type=int, default=8)
    p.add_argument("--check-prompt-len", type=int, default=32)
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--kv-cache-memory", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_one:
        args.result.write_text(json.dumps(run_one(args)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="layouts-"))
    model_dir = cut_config(args.config, args.num_layers, tmp / "model")
    results = []
    for layout in args.layouts.split(","):
        out = tmp / f"{layout}.json"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--run-one", layout, "--model-dir", str(model_dir),
               "--result", str(out)]
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise SystemExit(f"layout {layout} failed (exit {proc.returncode})")
        results.append(json.loads(out.read_text()))
        print(f"layout {layout}: done in {results[-1]['load_s']:.0f} s load", flush=True)
    rows = compare(results)
    print_summary(results, rows)
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "results": results, "comparison": rows}, indent=1))


if __name__ == "__main__":
    main()
