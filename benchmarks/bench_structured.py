"""Structured output's cost to a batch: decode throughput of 32 requests on CPU with 0, 1 and 32 of them
constrained by a JSON schema (the grammar masks computed on the host and applied in the batched sampler), and
the schema's compile and matcher-creation times.

    python benchmarks/bench_structured.py [--batch 32] [--steps 48] [--rounds 3] [--models embedded,v3vocab]

Models: ``embedded`` (the embedded model, 4,096-token vocabulary) and ``v3vocab`` (the embedded model's layer
sizes with DeepSeek-V3's 129,280-token vocabulary, dummy weights and a synthetic byte-level tokenizer), since
the mask's cost grows with the vocabulary. Only steps that sample all ``--batch`` rows count; the three
configurations run interleaved, ``--rounds`` times each, and the median of their rounds is reported, as
wall-clock tokens/s and as CPU seconds of this process per step (less disturbed by other jobs on a shared
machine). ``sampler_ms`` isolates what constraints add: one sampling step of the whole batch (host masks +
device mask + sampling) on random logits, median of 20.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grammar_libs import synthetic_tokenizer  # noqa: E402

from moeserve.coordinator.config import EngineConfig, default_model_path  # noqa: E402
from moeserve.coordinator.engine import Engine  # noqa: E402
from moeserve.coordinator.sampling import SamplingParams  # noqa: E402
from moeserve.coordinator.structured import compile_spec, spec_json  # noqa: E402

RECORD = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "role": {"enum": ["admin", "user", "guest"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4}},
    "required": ["name", "role", "age", "address", "tags"], "additionalProperties": False}
# at least 20 records: no constrained request can finish inside the measured steps
SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "items": RECORD, "minItems": 20}},
          "required": ["records"], "additionalProperties": False}


def v3vocab_model(root: Path) -> Path:
    cfg = json.loads((default_model_path() / "config.json").read_text())
    cfg["vocab_size"] = 129280
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    tok = synthetic_tokenizer(129280 - 2)
    tok.add_special_tokens(["<|bos|>", "<|eos|>"])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    return root


def run_once(engine: Engine, batch: int, constrained: int, steps: int, spec: str) -> tuple[float, float, float]:
    """(full-batch decode tokens/s, host seconds per step spent computing masks, CPU seconds per step)."""
    prompt = engine.tokenizer.encode("Return the records as JSON:")
    for i in range(batch):
        params = SamplingParams(max_tokens=steps + 2, temperature=1.0, seed=i, ignore_eos=i >= constrained,
                                structured_output=spec if i < constrained else None)
        engine.add_request(f"r{i}", prompt_token_ids=prompt, params=params)
    mask_s, bitmask = [0.0], engine.outputs.bitmask

    def timed(reqs):  # the host part of the mask, timed from outside the engine
        t = time.perf_counter()
        out = bitmask(reqs)
        mask_s[0] += time.perf_counter() - t
        return out

    engine.outputs.bitmask = timed  # type: ignore[method-assign]
    tokens, seconds, cpu, full_steps = 0, 0.0, 0.0, 0
    while engine.has_unfinished():
        t, c = time.perf_counter(), time.process_time()
        outs = engine.step()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        if len(outs) == batch and all(o.num_output_tokens > 1 for o in outs):  # decode steps of the whole batch
            tokens, seconds, cpu, full_steps = tokens + batch, seconds + dt, cpu + dc, full_steps + 1
    engine.outputs.bitmask = bitmask  # type: ignore[method-assign]
    return tokens / seconds, mask_s[0] / max(1, full_steps), cpu / max(1, full_steps)


def sampler_ms(engine: Engine, batch: int, constrained: int, spec: str) -> float:
    """One sampling step of the batch on random logits, with ``constrained`` live matchers."""
    from moeserve.coordinator.request import Request
    from moeserve.coordinator.sampling import make_sampling_batch

    reqs = [Request(f"s{i}", [0], SamplingParams(temperature=1.0, seed=i)) for i in range(batch)]
    for r in reqs[:constrained]:
        r.grammar = engine.outputs.structured.matcher(spec)
    logits = torch.randn(batch, engine.model_config.vocab_size)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        sb = make_sampling_batch([r.params for r in reqs], [[]] * batch, [[0]] * batch,
                                 [r.generator for r in reqs], "cpu", token_bitmask=engine.outputs.bitmask(reqs))
        engine.sampler.sample(logits, sb)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def bench_model(name: str, path: Path, args: argparse.Namespace) -> dict:
    engine = Engine(EngineConfig(model=str(path), kv_cache_memory=256 << 20, max_num_seqs=args.batch,
                                 load_format="auto" if name == "embedded" else "dummy"))
    spec = spec_json({"type": "json_schema", "schema": SCHEMA})
    compile_spec.cache_clear()
    t0 = time.perf_counter()
    compile_spec(spec)
    t1 = time.perf_counter()
    engine.outputs.structured.matcher(spec)  # builds the grammar vocabulary once
    t2 = time.perf_counter()
    engine.outputs.structured.matcher(spec)
    t3 = time.perf_counter()
    results: dict[int, list[tuple[float, float, float]]] = {n: [] for n in (0, 1, args.batch)}
    run_once(engine, args.batch, 0, 4, spec)  # warm-up
    for _ in range(args.rounds):
        for n in results:
            results[n].append(run_once(engine, args.batch, n, args.steps, spec))
    base = statistics.median(r[0] for r in results[0])
    base_cpu = statistics.median(r[2] for r in results[0])
    rows = {n: {"tok_s": round(statistics.median(r[0] for r in rs), 1),
                "vs_unconstrained": round(statistics.median(r[0] for r in rs) / base, 3),
                "cpu_s_per_step": round(statistics.median(r[2] for r in rs), 4),
                "cpu_vs_unconstrained": round(statistics.median(r[2] for r in rs) / base_cpu, 3),
                "mask_host_ms_per_step": round(1e3 * statistics.median(r[1] for r in rs), 3),
                "sampler_ms": round(sampler_ms(engine, args.batch, n, spec), 2)}
            for n, rs in results.items()}
    return {"model": name, "vocab": engine.model_config.vocab_size, "batch": args.batch, "steps": args.steps,
            "rounds": args.rounds, "threads": torch.get_num_threads(),
            "schema_compile_ms": round(1e3 * (t1 - t0), 2), "grammar_vocabulary_s": round(t2 - t1, 3),
            "matcher_ms": round(1e3 * (t3 - t2), 2), "constrained": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="embedded,v3vocab")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"embedded": default_model_path(), "v3vocab": None}
        for name in args.models.split(","):
            path = paths[name] or v3vocab_model(Path(tmp) / name)
            print(json.dumps(bench_model(name, path, args)), flush=True)


if __name__ == "__main__":
    main()
