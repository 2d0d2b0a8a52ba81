"""Start-up time of one replica with the mp and the Ray executor, for the same layout on one machine.

For each backend, ``--repeats`` times: build the Engine (plan, start the ranks, load the weights, wait for
every rank's ReadyMsg), time it, close it. The Ray runs join a Ray started once before them (as
``RAY_ADDRESS`` would give: a cluster that is already up, the case the backend is for); the Ray start itself
(``ray.init`` of a local instance) is timed once, apart. The order of backends alternates between repeats so
that a warm file cache favours neither. Prints one JSON object: the median and every run per backend, with the
1-minute load average at the start of each run (the machine may be shared).

    python benchmarks/bench_executor_startup.py --pp 2 --tp 2 --repeats 5
    python benchmarks/bench_executor_startup.py --device cuda --tp 2 --model /path/to/ckpt --load-format dummy

``--serve`` times what a user waits for instead: ``moeserve serve`` started as a process until its ``/health``
answers 200 (polled every 50 ms; the server's own warm-up generation included), then stopped with SIGTERM. Its
Ray runs join a two-node Ray started once before them on this machine (Ray's ``cluster_utils``, as the tests
use), through ``RAY_ADDRESS``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import time

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine


def start_once(config: EngineConfig) -> float:
    t0 = time.perf_counter()
    engine = Engine(config)
    seconds = time.perf_counter() - t0
    engine.close()
    return seconds


def serve_once(args: argparse.Namespace, backend: str, env: dict[str, str]) -> float:
    """Seconds from starting ``moeserve serve`` to its first 200 on /health."""
    from moeserve.frontend.testing import serve_subprocess

    argv = ["--pp", str(args.pp), "--tp", str(args.tp), "--device", args.device, "--load-format", args.load_format,
            "--kv-cache-memory", str(1 << 26), "--distributed-executor-backend", backend]
    if args.model:
        argv += ["--model", args.model]
    t0 = time.perf_counter()
    proc, _, _ = serve_subprocess(*argv, timeout_s=600, poll_s=0.05, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
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
    p.add_argument("--serve", action="store_true", help="time `moeserve serve` to a healthy /health instead")
    args = p.parse_args()
    if args.serve:
        return main_serve(args)
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


def main_serve(args: argparse.Namespace) -> None:
    from ray.cluster_utils import Cluster

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join([repo] + [x for x in [os.environ.get("PYTHONPATH")] if x])
    cpus = args.ray_cpus or args.pp * args.tp
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
    runs: dict[str, list[float]] = {"mp": [], "ray": []}
    load: dict[str, list[float]] = {"mp": [], "ray": []}
    try:
        cluster.wait_for_nodes()
        env = dict(os.environ, RAY_ADDRESS=cluster.address)
        for i in range(args.repeats):
            for backend in (("mp", "ray") if i % 2 == 0 else ("ray", "mp")):
                load[backend].append(round(os.getloadavg()[0], 2))
                runs[backend].append(serve_once(args, backend, env))
    finally:
        cluster.shutdown()
    median = {b: statistics.median(r) for b, r in runs.items()}
    print(json.dumps({"what": "moeserve serve to a healthy /health", "layout": f"pp={args.pp} tp={args.tp}",
                      "device": args.device, "repeats": args.repeats, "median_s": median,
                      "ray_over_mp": median["ray"] / median["mp"], "runs_s": runs, "load_average_1min": load},
                     indent=2))


if __name__ == "__main__":
    main()
