"""What store writes cost the thread that runs the steps: a stand-in step loop, with and without saves.

Starts its own ``redis-server`` on a free loopback port and a rank's ``BlockMover`` over a cache of the given
model shape. The calling thread then runs ``--steps`` stand-in steps (``--ops`` small torch ops and the
Python around them, as an engine thread runs between kernel launches) twice: without saves, then saving
``--blocks`` full blocks every ``--save-every`` steps, as a rank does when requests fill blocks (the save is
called from the step thread; the mover's writer thread encodes and sends them). A step that waits for the
GIL or for the save's copies shows in the step times' tail. Interleaved over ``--rounds``.

    PYTHONPATH=. python benchmarks/bench_kvstore_writes.py --shape v2-lite
    PYTHONPATH=. python benchmarks/bench_kvstore_writes.py --shape v2-lite --device cuda
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisServer  # noqa: E402

from moeserve.kvstore.block_format import BlockLayout  # noqa: E402
from moeserve.kvstore.mover import BlockMover  # noqa: E402
from moeserve.kvstore.store import RedisStore  # noqa: E402
from moeserve.launch.cmd_bench import percentile  # noqa: E402

SHAPES = {"v2-lite": (27, 576, "bfloat16", 64), "embedded": (5, 128, "float32", 16)}


def steps(n: int, ops: int, x: torch.Tensor, on_step=None) -> list[float]:
    """``n`` stand-in steps of ``ops`` small ops each -> each step's seconds; ``on_step(i)`` after step i."""
    times = []
    for i in range(n):
        start = time.perf_counter()
        y = x
        for _ in range(ops):
            y = y + 1.0
        if x.device.type != "cpu":
            torch.accelerator.synchronize(x.device)
        times.append(time.perf_counter() - start)
        if on_step is not None:
            on_step(i)
    return times


def summary(times: list[float]) -> dict:
    return {"p50_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * percentile(times, 99),
            "max_ms": 1e3 * max(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="v2-lite")
    p.add_argument("--device", default="cpu")
    p.add_argument("--blocks", type=int, default=32, help="blocks per save (32 sequences filling a block each)")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--ops", type=int, default=1000, help="small ops per stand-in step (about 4 ms on a CPU core)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    layers, dim, dtype_name, bs = SHAPES[args.shape]
    dtype, device = getattr(torch, dtype_name), torch.device(args.device)
    torch.set_num_threads(1)  # the step thread's ops stay on one core: the other is the writer's
    num_blocks = 2 * args.blocks
    caches = {i: torch.randn(num_blocks, bs, dim, device=device).to(dtype) for i in range(layers)}
    layout = BlockLayout("0" * 32, dtype_name, bs, 0, 0, layers, dim)
    x = torch.randn(64, 256, device=device)
    result: dict = {"args": vars(args) | {"json_out": str(args.json_out)}, "rounds": []}
    with RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-"))) as server:
        server.cli("config", "set", "maxmemory", "0")
        mover = BlockMover(caches, layout, 0, RedisStore(server.url), writes=True)
        counter = iter(range(1, 1 << 62))

        def save(i: int) -> None:
            if i % args.save_every == args.save_every - 1:
                hashes = [next(counter) for _ in range(args.blocks)]
                blocks = list(range(args.blocks)) if (i // args.save_every) % 2 else list(range(args.blocks, num_blocks))
                mover.save(blocks, [-1] * args.blocks, hashes, [list(range(bs))] * args.blocks, [True] * args.blocks)

        steps(20, args.ops, x)  # warm-up
        for _ in range(args.rounds):
            off = steps(args.steps, args.ops, x)
            start = time.perf_counter()
            on = steps(args.steps, args.ops, x, save)
            assert mover.flush(60.0), "the writer did not finish"
            seconds = time.perf_counter() - start
            written = mover.counters.blocks_written
            r = {"writes_off": summary(off), "writes_on": summary(on),
                 "blocks_written": written, "writes_dropped": mover.counters.writes_dropped,
                 "write_gb_s": written * layout.value_bytes / seconds / 1e9}
            r["p50_ratio"] = r["writes_on"]["p50_ms"] / r["writes_off"]["p50_ms"]
            r["p99_ratio"] = r["writes_on"]["p99_ms"] / r["writes_off"]["p99_ms"]
            result["rounds"].append(r)
            print(json.dumps(r), flush=True)
        mover.close()
    result["p99_ratio_median"] = statistics.median(r["p99_ratio"] for r in result["rounds"])
    result["p50_ratio_median"] = statistics.median(r["p50_ratio"] for r in result["rounds"])
    print(json.dumps({k: result[k] for k in ("p50_ratio_median", "p99_ratio_median")}))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
