"""The CPU MLA decode kernel alone (kernels/cpu_mla.py): milliseconds per layer at bench_cpu.py's widths.

    python benchmarks/bench_cpu_mla_decode.py [--threads 2] [--context 200] [--batch 64] [--cached-blocks N]

Both paths of the kernel, one after the other: AMX tiles (where they were built and fit) and AVX-512 BF16.

64 sequences of ``--context`` tokens, 8 heads, a 576-wide latent (512 + 64 rope) in a paged cache of 233k rows
in blocks of 16, each sequence's blocks drawn at random. ``--cached-blocks 13`` makes every sequence share
the same 13 blocks (a cache that stays in L2): if the time does not drop, the kernel is bound by its
arithmetic, not by reading the rows.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--cached-blocks", type=int, default=0, help="0: the whole cache")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    from moeserve.kernels import cpu_build, cpu_mla

    if not cpu_build.mla_vectorized():
        raise SystemExit(f"the CPU MLA kernel does not run here: {cpu_build.status()}")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    block, width, kv_lora = 16, 576, 512
    blocks = args.cached_blocks or 233008 // block
    cache = torch.randn(blocks * block, width).bfloat16()
    per_seq = -(-args.context // block)
    tables = torch.stack([torch.randperm(blocks)[:per_seq] for _ in range(args.batch)])
    lens = torch.full((args.batch,), args.context)
    q = torch.randn(args.batch, args.heads, width).bfloat16()
    for path, tiles in (("AMX tiles", True), ("AVX-512 BF16", False)):
        if tiles and not cpu_build.mla_tiles():
            print(f"{path}: not here ({cpu_build.status()})")
            continue
        with torch.no_grad():
            for _ in range(5):
                cpu_mla.mla_decode(q, cache, tables, lens, block, kv_lora, width ** -0.5, tiles=tiles)
            start = time.perf_counter()
            for _ in range(args.reps):
                cpu_mla.mla_decode(q, cache, tables, lens, block, kv_lora, width ** -0.5, tiles=tiles)
            seconds = (time.perf_counter() - start) / args.reps
        print(f"{path}: context {args.context}, batch {args.batch}, {args.heads} heads, {args.threads} threads: "
              f"{seconds * 1e3:.3f} ms a layer, {args.batch * args.context * width * 2 / seconds / 1e9:.1f} GB/s of "
              "rows")


if __name__ == "__main__":
    main()
