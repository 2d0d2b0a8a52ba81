"""How a decode step's pieces scale with CPU threads: memory bandwidth, the routed-expert kernel, and the small
ops around it, each timed alone at several thread counts in one process.

    python benchmarks/probe_cpu_threads.py [--threads 2,4,8,16] [--json-out p.json]

Shapes are bench_cpu.py's V2-shaped checkpoint at batch 64 (hidden 1024, 16 experts of 512, top-4, MLA's
kv rank 512 and rope 64, a paged cache of 233k rows). Each figure is the median wall time of ``--reps`` calls
back to back; "after experts" times the op right after an expert call, which is where a decode step meets it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn, reps: int, before=None) -> float:
    """Median wall ms of ``fn()`` over ``reps`` calls (``before()`` runs untimed ahead of each)."""
    out = []
    for _ in range(reps + 2):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return 1e3 * statistics.median(out[2:])


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="2,4,8,16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    from moeserve.kernels import cpu_moe, cpu_norm
    from moeserve.kernels.cpu_build import amx_tiles
    from moeserve.model.cpu_linear import PackedLinear

    torch.manual_seed(0)
    bf = torch.bfloat16
    T, H, INTER, E, K = 64, 1024, 512, 16, 4
    big = torch.empty(256 << 20, dtype=torch.uint8)  # 256 MB
    big2 = torch.empty_like(big)
    big.fill_(1)
    big2.fill_(2)
    w13 = torch.randn(E, 2 * INTER, H, dtype=bf) * 0.02
    w2 = torch.randn(E, H, INTER, dtype=bf) * 0.02
    x = torch.randn(T, H, dtype=bf)
    weights = torch.rand(T, K).softmax(-1)
    slots = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).flatten()
    packed = (cpu_moe.pack_experts(w13), cpu_moe.pack_experts(w2)) if amx_tiles() else None
    norm_w = torch.ones(512, dtype=bf)
    kv = torch.randn(T, 512, dtype=bf)
    cache = torch.zeros(233008, 576, dtype=bf)
    rows = torch.randperm(233008)[:T]
    new_rows = torch.randn(T, 576, dtype=bf)
    q = torch.randn(8, T, 128, dtype=bf)
    wkc = torch.randn(8, 128, 512, dtype=bf)
    lin, lin_w = PackedLinear(), torch.randn(2048, H, dtype=bf) * 0.02
    src = torch.randn(8, T, 128, dtype=bf).transpose(0, 1)
    dst = torch.empty(T, 8, 128, dtype=bf)

    def experts():
        cpu_moe.routed_experts(x, weights, slots, E, *packed)

    ops = {
        "rms_norm [64,512]": lambda: cpu_norm.rms_norm(kv, norm_w, 1e-6),
        "index_copy_ cache rows": lambda: cache.index_copy_(0, rows, new_rows),
        "bmm [8,64,128]x[8,128,512]": lambda: torch.bmm(q, wkc),
        "linear 64x1024->2048": lambda: lin(x, lin_w, "w"),
        "copy_ [64,8,128] strided": lambda: dst.copy_(src),
        "add [64,1024]": lambda: x + x,
    }
    results = []
    for n in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(n)
        row = {"threads": n,
               "copy_GBps": 2 * big.numel() / 1e6 / timed(lambda: big2.copy_(big), 10),
               "sum_GBps": big.numel() / 1e6 / timed(lambda: big.view(torch.float32).sum(), 10)}
        if packed is not None:
            ms = timed(experts, args.reps)
            row["experts_ms"] = ms
            row["experts_GBps"] = (w13.numel() + w2.numel()) * 2 / 1e6 / ms
        for name, fn in ops.items():
            row[name] = timed(fn, args.reps)
            if packed is not None:
                row[name + " after experts"] = timed(fn, args.reps, before=experts)
        results.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
