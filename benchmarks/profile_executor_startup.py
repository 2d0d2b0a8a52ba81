"""Where the start of one replica goes, phase by phase, with the mp and the Ray executor (issue 23).

Same set-up as bench_executor_startup.py (the embedded model, a local Ray started once before, backends
alternating), but every phase is stamped with the wall clock, in the driver and inside each rank's process:
the rank's process created (psutil), its Python code first running (the actor's constructor, or this script's
``--rank`` entry for mp), the rank code imported, the torch.distributed rendezvous, the preflight collectives,
the weight load, the runner, the ReadyMsg sent. Prints one JSON object: per backend, the median over the
repeats of each phase's start and end (seconds from ``Engine()``), the earliest rank for ``first`` and the
latest for ``last``.

    python benchmarks/profile_executor_startup.py --pp 2 --tp 2 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

# the driver makes it; its mp ranks inherit it (the Ray actors get it with the traced class, by value)
TRACE_DIR = Path(os.environ.setdefault("STARTUP_TRACE_DIR", tempfile.mkdtemp(prefix="moeserve-startup-trace-")))
PER_RUN = ("first:process", "last:process", "first:python_entry", "last:python_entry", "d_engine_returned")
RANK_PHASES = ("init_groups", "time_collectives", "load_model", "ModelRunner")


def stamp(trace: Path, phase: str, start: float, end: float | None = None) -> None:
    with trace.open("a") as f:
        f.write(json.dumps([phase, start, start if end is None else end]) + "\n")


def traced(fn: Any, trace: Path, phase: str) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            stamp(trace, phase, t0, time.time())
    return wrapper


def process_created() -> float:
    """This process's start on the wall clock, to a clock tick (/proc's start time is in ticks since boot)."""
    ticks = os.sysconf("SC_CLK_TCK")
    since_boot = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)


def traced_rank_main(spec_json: str, trace: Path, entered: float) -> int:
    """The rank's main (stages/worker.py) with its phases stamped into ``trace``."""
    stamp(trace, "process", process_created())
    stamp(trace, "python_entry", entered)
    t0 = time.time()
    import moeserve.stages.worker as worker
    stamp(trace, "import_rank_code", t0, time.time())
    assert worker.__file__.startswith(str(Path(__file__).resolve().parent.parent)), worker.__file__
    for phase in RANK_PHASES:
        setattr(worker, phase, traced(getattr(worker, phase), trace, phase))
    serve = worker.StageWorker.serve
    worker.StageWorker.serve = lambda self, sock: (stamp(trace, "ready_sent", time.time()), serve(self, sock))[1]
    return worker.main([spec_json])


def rank_trace(spec_json: str) -> Path:
    return TRACE_DIR / f"rank-{json.loads(spec_json)['rank']}.jsonl"


def patch_mp() -> None:
    """mp ranks start as ``python this_script --rank SPEC`` (the same interpreter start as ``-m``)."""
    import moeserve.coordinator.mp_executor as mp

    def spawn(specs: list, env: dict[str, str] | None = None) -> list:
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        return [subprocess.Popen([sys.executable, __file__, "--rank", s.to_json()], env=child_env,
                                 start_new_session=True) for s in specs]
    mp.spawn_workers = spawn  # type: ignore[assignment]


def patch_ray(driver: Path) -> None:
    """The actor class becomes a subclass defined here (sent by value) that stamps its phases; the driver's
    placement-group and ``ray.get`` waits are stamped too."""
    import ray

    import moeserve.coordinator.ray_actor as ra
    import moeserve.coordinator.ray_executor as rx

    class TracedRank(ra.MoeserveRank):  # type: ignore[name-defined]
        def __init__(self, spec_json: str, env: dict[str, str]) -> None:
            self.entered = time.time()
            super().__init__(spec_json, env)

        def _main(self, spec_json: str) -> None:
            self.exit_code = traced_rank_main(spec_json, rank_trace(spec_json), self.entered)

    ra.MoeserveRank = TracedRank  # type: ignore[misc]
    rx.reserve = traced(rx.reserve, driver, "d_placement_groups")  # type: ignore
    rx.RayExecutor._start_actors = traced(rx.RayExecutor._start_actors, driver, "d_start_actors")  # type: ignore
    rx.RayExecutor._start_ranks = traced(rx.RayExecutor._start_ranks, driver, "d_start_ranks")  # type: ignore
    rx.ray.get = traced(ray.get, driver, "d_ray_get")  # type: ignore[attr-defined]


def phases(t0: float, driver: Path) -> dict[str, tuple[float, float]]:
    """Each phase's (start, end) from ``t0``: driver phases as stamped (several ``d_ray_get``: numbered),
    rank phases as ``first:<phase>`` (earliest start over the ranks) and ``last:<phase>`` (latest end)."""
    out: dict[str, tuple[float, float]] = {}
    counts: dict[str, int] = defaultdict(int)
    for line in driver.read_text().splitlines() if driver.exists() else []:
        name, s, e = json.loads(line)
        counts[name] += 1
        out[f"{name}#{counts[name]}" if name == "d_ray_get" else name] = (s - t0, e - t0)
    per_rank: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for trace in TRACE_DIR.glob("rank-*.jsonl"):
        for line in trace.read_text().splitlines():
            name, s, e = json.loads(line)
            per_rank[name].append((s - t0, e - t0))
    for name, spans in per_rank.items():
        out[f"first:{name}"] = (min(s for s, _ in spans), min(e for _, e in spans))
        out[f"last:{name}"] = (max(s for s, _ in spans), max(e for _, e in spans))
    return out


def start_once(config: Any) -> dict[str, tuple[float, float]]:
    from moeserve.coordinator.engine import Engine

    for trace in TRACE_DIR.glob("*.jsonl"):
        trace.unlink()
    driver = TRACE_DIR / "driver.jsonl"
    t0 = time.time()
    engine = Engine(config)
    stamp(driver, "d_engine_returned", time.time())
    engine.close()
    return phases(t0, driver)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import ray

    from moeserve.coordinator.config import EngineConfig

    ray.init(num_cpus=args.pp * args.tp, include_dashboard=False, logging_level=logging.WARNING)
    patch_mp()
    patch_ray(TRACE_DIR / "driver.jsonl")
    runs: dict[str, list[dict[str, tuple[float, float]]]] = {"mp": [], "ray": []}
    try:
        for i in range(args.repeats):
            for backend in (("mp", "ray") if i % 2 == 0 else ("ray", "mp")):
                config = EngineConfig(model="", device="cpu", pp=args.pp, tp=args.tp, skip_tokenizer_init=True,
                                      kv_cache_memory=1 << 26, distributed_executor_backend=backend)
                runs[backend].append(start_once(config))
    finally:
        ray.shutdown()
    report: dict[str, Any] = {"layout": f"pp={args.pp} tp={args.tp}", "repeats": args.repeats,
                              "load_average": os.getloadavg()}
    for backend, rs in runs.items():
        names = sorted({n for r in rs for n in r}, key=lambda n: statistics.median(r[n][0] for r in rs if n in r))
        report[backend] = {n: [round(statistics.median(r[n][k] for r in rs if n in r), 3) for k in (0, 1)]
                           for n in names}
        report[f"{backend}_runs"] = [{n: round(r[n][0], 2) for n in PER_RUN if n in r} for r in rs]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        entered = time.time()
        sys.exit(traced_rank_main(sys.argv[2], rank_trace(sys.argv[2]), entered))
    main()
