"""Start-up time of one replica with the mp and the Ray executor, for the same layout on one machine.

For each backend, ``--repeats`` times: build the Engine (plan, start the ranks, load the weights, wait for
every rank's ReadyMsg), time it, close it. The Ray runs join a Ray started once before them (as
``RAY_ADDRESS`` would give: a cluster that is already up, the case the backend is for); the Ray start itself
(``ray.init`` of a local instance) is timed once, apart. The order of backends alternates between repeats so
that a warm file cache favours neither. Prints one JSON object: the median and every run per backend, with the
1-minute load average at the start of each run (the machine may be shared).

    python benchmarks/bench_executor_startup.py --pp 2 --tp 2 --repeats 5
    python benchmarks/bench_executor_startup.py --device cuda --tp 2 --model /path/to/ckpt --load-format dummy
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine


def start_once(config: EngineConfig) -> float:
    t0 = time.perf_counter()
    engine = Engine(config)
    seconds = time.perf_counter() - t0
    engine.close()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="checkpoint directory (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ray-cpus", type=int, default=0, help="logical CPUs of the local Ray (default: pp x tp)")
    p.add_argument("--ray-startup-concurrency", type=int, default=0,
                   help="Ray workers a node starts at once (Ray's worker_maximum_startup_concurrency; default: "
                        "Ray's, the node's CPU count)")
    args = p.parse_args()
    import ray

    t0 = time.perf_counter()
    system = {"worker_maximum_startup_concurrency": args.ray_startup_concurrency} \
        if args.ray_startup_concurrency else None
    ray.init(num_cpus=args.ray_cpus or args.pp * args.tp, include_dashboard=False, logging_level=logging.WARNING,
             _system_config=system)
    ray_init_s = time.perf_counter() - t0
    runs: dict[str, list[float]] = {"mp": [], "ray": []}
    load: dict[str, list[float]] = {"mp": [], "ray": []}
    try:
        for i in range(args.repeats):
            for backend in (("mp", "ray") if i % 2 == 0 else ("ray", "mp")):
                config = EngineConfig(model=args.model, device=args.device, pp=args.pp, tp=args.tp,
                                      load_format=args.load_format, skip_tokenizer_init=True,
                                      kv_cache_memory=1 << 26, distributed_executor_backend=backend)
                load[backend].append(round(os.getloadavg()[0], 2))
                runs[backend].append(start_once(config))
    finally:
        ray.shutdown()
    median = {b: statistics.median(r) for b, r in runs.items()}
    print(json.dumps({"layout": f"pp={args.pp} tp={args.tp}", "device": args.device, "repeats": args.repeats,
                      "ray_startup_concurrency": args.ray_startup_concurrency or "ray's default",
                      "median_s": median, "ray_over_mp": median["ray"] / median["mp"],
                      "ray_init_local_s": ray_init_s, "runs_s": runs, "load_average_1min": load}, indent=2))


if __name__ == "__main__":
    main()
