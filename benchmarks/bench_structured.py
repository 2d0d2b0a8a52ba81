"""Structured output's cost to a batch: decode throughput of 32 requests on CPU with 0, 1 and 32 of them
constrained by a JSON schema (the grammar masks computed on the host and applied in the batched sampler), and
the schema's compile and matcher-creation times.

    python benchmarks/bench_structured.py [--batch 32] [--steps 48] [--models embedded,v3vocab] [--threads 1]

Models: ``embedded`` (the embedded model, 4,096-token vocabulary) and ``v3vocab`` (the embedded model's layer
sizes with DeepSeek-V3's 129,280-token vocabulary, dummy weights and a synthetic byte-level tokenizer), since
the mask's cost grows with the vocabulary. Three engines (0, 1 and ``--batch`` constrained requests) step
in turn, so that the same step of each meets the same load from other jobs on a shared machine; only decode
steps of the whole batch count, and ``step_time_vs_unconstrained`` is the median over aligned steps of the
step time's ratio to the unconstrained engine's, in wall time and in CPU time of this process (the latter
much less disturbed by other jobs; with ``--threads 1`` it is the work itself). ``sampler_*`` isolates what constraints add: one sampling
step of the whole batch (host masks + device mask + sampling) on random logits, configurations timed back to
back 30 times.
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


def add_batch(engine: Engine, batch: int, constrained: int, steps: int, spec: str) -> None:
    prompt = engine.tokenizer.encode("Return the records as JSON:")
    for i in range(batch):
        params = SamplingParams(max_tokens=steps + 2, temperature=1.0, seed=i, ignore_eos=i >= constrained,
                                structured_output=spec if i < constrained else None)
        engine.add_request(f"r{i}", prompt_token_ids=prompt, params=params)


Times = dict[int, list[tuple[float, float]]]  # per configuration: (wall s, CPU s of this process) per repetition


def interleaved_steps(engines: dict[int, Engine], batch: int, steps: int, spec: str) -> Times:
    """Step the engines (one per number of constrained requests) in turn, so that each step of one meets the
    same background load as the same step of the others; the wall time of every decode step of the whole
    batch, per engine."""
    for n, engine in engines.items():
        add_batch(engine, batch, n, steps, spec)
    times: Times = {n: [] for n in engines}
    while any(e.has_unfinished() for e in engines.values()):
        for n, engine in engines.items():
            if not engine.has_unfinished():
                continue
            t, c = time.perf_counter(), time.process_time()
            outs = engine.step()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if len(outs) == batch and all(o.num_output_tokens > 1 for o in outs):
                times[n].append((dt, dc))
    return times


def sampler_times(engine: Engine, batch: int, counts: tuple[int, ...], spec: str, reps: int = 30) -> Times:
    """One sampling step of the batch on random logits (host masks + device mask + sampling) with each number
    of live matchers, the configurations timed back to back ``reps`` times."""
    from moeserve.coordinator.request import Request
    from moeserve.coordinator.sampling import make_sampling_batch

    reqs = {n: [Request(f"s{i}", [0], SamplingParams(temperature=1.0, seed=i)) for i in range(batch)]
            for n in counts}
    for n, rs in reqs.items():
        for r in rs[:n]:
            r.grammar = engine.outputs.structured.matcher(spec)
    logits = torch.randn(batch, engine.model_config.vocab_size)
    times: Times = {n: [] for n in counts}
    for _ in range(reps):
        for n, rs in reqs.items():
            t, c = time.perf_counter(), time.process_time()
            sb = make_sampling_batch([r.params for r in rs], [[]] * batch, [[0]] * batch,
                                     [r.generator for r in rs], "cpu", token_bitmask=engine.outputs.bitmask(rs))
            engine.sampler.sample(logits, sb)
            times[n].append((time.perf_counter() - t, time.process_time() - c))
    return times


def paired(times: Times, n: int, k: int) -> float:
    """Median over aligned repetitions of time(n constrained) / time(0 constrained); k: 0 wall, 1 CPU."""
    return statistics.median(a[k] / b[k] for a, b in zip(times[n], times[0]))


def summary(steps: Times, samp: Times, n: int, batch: int) -> dict[str, float]:
    med = {k: statistics.median(t[k] for t in steps[n]) for k in (0, 1)}
    return {"decode_tok_s": round(batch / med[0], 1), "step_wall_vs_unconstrained": round(paired(steps, n, 0), 3),
            "step_cpu_s": round(med[1], 4), "step_cpu_vs_unconstrained": round(paired(steps, n, 1), 3),
            "sampler_cpu_ms": round(1e3 * statistics.median(t[1] for t in samp[n]), 2),
            "sampler_wall_ms_min": round(1e3 * min(t[0] for t in samp[n]), 2)}


def bench_model(name: str, path: Path, args: argparse.Namespace) -> dict:
    cfg = EngineConfig(model=str(path), kv_cache_memory=128 << 20, max_num_seqs=args.batch,
                       load_format="auto" if name == "embedded" else "dummy")
    counts = (0, 1, args.batch)
    engines = {n: Engine(cfg) for n in counts}
    spec = spec_json({"type": "json_schema", "schema": SCHEMA})
    compile_spec.cache_clear()
    t0 = time.perf_counter()
    compile_spec(spec)
    t1 = time.perf_counter()
    for e in engines.values():
        e.outputs.structured.matcher(spec)  # builds each engine's grammar vocabulary once
    t2 = time.perf_counter()
    engines[0].outputs.structured.matcher(spec)
    t3 = time.perf_counter()
    interleaved_steps(engines, args.batch, 3, spec)  # warm-up
    steps = interleaved_steps(engines, args.batch, args.steps, spec)
    samp = sampler_times(engines[0], args.batch, counts, spec)
    rows = {n: summary(steps, samp, n, args.batch) for n in counts}
    return {"model": name, "vocab": engines[0].model_config.vocab_size, "batch": args.batch,
            "steps_measured": len(steps[0]), "threads": torch.get_num_threads(),
            "schema_compile_ms": round(1e3 * (t1 - t0), 2),
            "grammar_vocabulary_s": round((t2 - t1) / len(engines), 3),
            "matcher_ms": round(1e3 * (t3 - t2), 2), "constrained": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--models", default="embedded,v3vocab")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"embedded": default_model_path(), "v3vocab": None}
        for name in args.models.split(","):
            path = paths[name] or v3vocab_model(Path(tmp) / name)
            print(json.dumps(bench_model(name, path, args)), flush=True)


if __name__ == "__main__":
    main()
