"""How long replacing the ranks of a replica takes (``Executor.restart``, what self-healing does after a rank
died), against the checkpoint's size: every rank is killed, the next generation starts (Python + torch
import), meets on a fresh rendezvous, times the preflight collectives and loads its share of the weights
again from the checkpoint (from the page cache: it was read at start).

Random-weight checkpoints of growing width (float32) are written once to ``--dir``; for each, an engine with
``--pp 2`` is started and restarted ``--repeat`` times; the median restart seconds and the bytes per rank
are printed as a table row. Read the slope (seconds per GiB per rank) as the part that scales with the
checkpoint; the intercept is process start and rendezvous.

    python benchmarks/bench_restart.py --widths 256 1024 2048 --repeat 3
    python benchmarks/bench_restart.py --model /path/to/DeepSeek-V3 --device cuda --pp 2 --tp 4   # a GPU host
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.model.synthetic import tiny_config, write_random_checkpoint


def checkpoint(root: Path, width: int) -> Path:
    path = root / f"w{width}"
    if not (path / "config.json").exists():
        config = tiny_config(hidden_size=width, intermediate_size=2 * width, moe_intermediate_size=width // 2,
                             num_hidden_layers=4, vocab_size=4096, n_routed_experts=16)
        write_random_checkpoint(config, path)
    return path


def measure(path: Path, repeat: int, pp: int, tp: int = 1, device: str = "cpu") -> dict:
    engine = Engine(EngineConfig(model=str(path), pp=pp, tp=tp, device=device, kv_cache_memory=1 << 24,
                                 skip_tokenizer_init=True, kv_host_memory=0))
    try:
        seconds = []
        for _ in range(repeat):
            start = time.perf_counter()
            engine.executor.restart()
            seconds.append(time.perf_counter() - start)
        loaded = dict(engine.executor.loaded_bytes)  # type: ignore[attr-defined]
    finally:
        engine.close()
    return {"max_bytes_per_rank": max(loaded.values()), "restart_s": statistics.median(seconds),
            "all_s": [round(s, 2) for s in seconds]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda / npu (rank i takes device i)")
    p.add_argument("--model", default=None, help="a real checkpoint to time instead of the random ones")
    p.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temporary dir)")
    args = p.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-restart-"))
    print("| checkpoint | MiB per rank (largest) | restart s (median) | each |")
    print("|---|---|---|---|")
    paths = [Path(args.model)] if args.model else [checkpoint(root, width) for width in args.widths]
    for path in paths:
        row = measure(path, args.repeat, args.pp, args.tp, args.device)
        print(f"| {path.name} | {row['max_bytes_per_rank'] / 2**20:.0f} | {row['restart_s']:.2f} | {row['all_s']} |",
              flush=True)


if __name__ == "__main__":
    main()
