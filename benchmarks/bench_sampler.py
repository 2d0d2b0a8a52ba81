"""The sampler alone at DeepSeek's vocabulary: one ``Sampler.sample`` of a batch of random logits per
configuration (greedy, temperature 1 with and without seeds, top-k, top-p, top-k + top-p, min-p, a mixed
batch), configurations timed back to back ``--reps`` times; median and minimum wall ms and median CPU ms.
The logits have eight clear favourites over a random tail (a nucleus of top-p 0.9 within the favourites),
except for "wide nucleus", where the tail holds most of the mass (top-p 0.9 then keeps ~100k tokens).

    python benchmarks/bench_sampler.py [--batch 32] [--vocab 129280] [--threads 1] [--reps 20]

Point PYTHONPATH at another checkout to time its sampler with the same script (the "before" figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moeserve.coordinator.sampling import Sampler, SamplingParams, make_sampling_batch

CONFIGS: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "greedy, logprobs": {"temperature": 0.0, "logprobs": 0},  # the chosen tokens' log-probs asked for
    "temperature 1": {"temperature": 1.0},
    "temperature 1, seeded": {"temperature": 1.0, "seed": 0},
    "top_k 50": {"temperature": 0.8, "top_k": 50},
    "top_p 0.9": {"temperature": 0.8, "top_p": 0.9},
    "top_p 0.9, wide nucleus": {"temperature": 0.8, "top_p": 0.9},
    "top_k 50 + top_p 0.9": {"temperature": 0.8, "top_k": 50, "top_p": 0.9},
    "min_p 0.05": {"temperature": 0.8, "min_p": 0.05},
}


def batch_params(name: str, batch: int) -> list[SamplingParams]:
    if name == "mixed":  # a quarter each: greedy, seeded temperature, top-p, top-k
        kinds = ["greedy", "temperature 1, seeded", "top_p 0.9", "top_k 50"]
        return [batch_params(kinds[i % 4], 1)[0] for i in range(batch)]
    kw = CONFIGS[name]
    return [SamplingParams(**{**kw, "seed": i} if "seed" in kw else kw) for i in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wide = torch.randn(args.batch, args.vocab) * 2.0
    wide[:, :8] += 6.0
    peaked = wide.clone()
    peaked[:, :8] += 10.0
    sampler = Sampler()
    names = [*CONFIGS, "mixed"]
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for rep in range(args.reps + 1):
        for name in names:
            params = batch_params(name, args.batch)
            gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
            t, c = time.perf_counter(), time.process_time()
            batch = make_sampling_batch(params, [[]] * args.batch, [[0]] * args.batch, gens, "cpu")
            sampler.sample(wide if "wide" in name else peaked, batch)
            if rep:  # the first round warms up
                times[name].append((time.perf_counter() - t, time.process_time() - c))
    for name in names:
        wall = [w for w, _ in times[name]]
        print(json.dumps({"config": name, "batch": args.batch, "vocab": args.vocab, "threads": args.threads,
                          "wall_ms_median": round(1e3 * statistics.median(wall), 2),
                          "wall_ms_min": round(1e3 * min(wall), 2),
                          "cpu_ms_median": round(1e3 * statistics.median(c for _, c in times[name]), 2)}))


if __name__ == "__main__":
    main()
