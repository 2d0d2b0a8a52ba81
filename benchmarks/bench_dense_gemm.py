"""The dense linears of a decode step (attention projections, shared experts, dense MLP, LM head) at decode row
counts: cuBLAS (``F.linear``, what the engine runs) against a Triton GEMM with small tiles and split-K.

At 64 rows the sixteenth session's profile (BENCHMARKS.md, issue 20) found V2-Lite's dense GEMMs reading about
1.6 GB a step at 38% of the copy bandwidth: a [64 x 2048] x [2048 x 3648] product in tiles of 128 columns is 29
programs for 132 multiprocessors. This asks, per weight shape and row count, how fast the same product can be
with enough programs (narrower tiles, K split over programs whose last one sums the float32 partials in a fixed
order: one launch, deterministic).

Each case replays, from one CUDA graph, the product over enough copies of the weight to pass the L2 (as a step
reads each layer's weight once), median of ``triton.testing.do_bench``. Reported per case: cuBLAS ms, the best
Triton configuration and its ms, both as a share of the copy bandwidth; per model and batch, the step's sum
(each shape times its count a step). GPU only:

    python benchmarks/bench_dense_gemm.py --json-out dense_gemm.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bench_moe_kernels import copy_bandwidth, graph_ms

# model: [(name, out_features, in_features, count in a decode step)]
SHAPES = {
    "v2lite": [("q+latent", 3648, 2048, 27), ("o_proj", 2048, 2048, 27), ("shared gate/up", 5632, 2048, 26),
               ("shared down", 2048, 2816, 26), ("dense gate/up", 21888, 2048, 1), ("dense down", 2048, 10944, 1),
               ("lm_head", 102400, 2048, 1)],
    "v3": [("q_a+latent", 2112, 7168, 6), ("q_b", 24576, 1536, 6), ("o_proj", 7168, 16384, 6),
           ("shared gate/up", 4096, 7168, 3), ("shared down", 7168, 2048, 3), ("dense gate/up", 36864, 7168, 3),
           ("dense down", 7168, 18432, 3), ("lm_head", 129280, 7168, 1)],
}
ROWS = {"v2lite": (1, 4, 64, 256), "v3": (1, 32)}
# (BN, BK, stages, warps); BM follows the row count
TILES = [(32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 3, 4), (128, 128, 3, 4), (128, 64, 4, 4), (64, 128, 4, 8)]
SPLITS = (1, 2, 4, 8, 16)
PROGRAMS = 132  # an H100's or H200's multiprocessors
CACHE_BYTES = 256 << 20  # the copies of a weight add up to more than any L2


@triton.jit
def _gemm(x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, M, N, K, k_per_split, split_k,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[M, N] = x[M, K] @ w[N, K]^T for one (BM, BN) tile and one K range; with split_k > 1 the tile's last
    program to finish sums the float32 partials in split order and writes y (so the result does not depend on
    which program finished when), then resets the tile's counter for the next launch."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.cdiv(N, BN)
    pm, pn = tile // tiles_n, tile % tiles_n
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k_start = split * k_per_split
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(k_start, k_start + k_per_split, BK):
        a = tl.load(x_ptr + rm[:, None] * K + (k + rk)[None, :], mask=(rm[:, None] < M) & ((k + rk)[None, :] < K),
                    other=0.0)
        b = tl.load(w_ptr + rn[None, :] * K + (k + rk)[:, None], mask=(rn[None, :] < N) & ((k + rk)[:, None] < K),
                    other=0.0)
        acc = tl.dot(a, b, acc)
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if split_k == 1:
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        offs = rm[:, None] * N + rn[None, :]
        tl.store(part_ptr + split * M * N + offs, acc, mask=out_mask)
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if done == split_k - 1:
            total = tl.zeros((BM, BN), tl.float32)
            for s in range(0, split_k):
                total += tl.load(part_ptr + s * M * N + offs, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(count_ptr + tile, 0)


class SplitGemm:
    def __init__(self, m: int, n: int, k: int, bm: int, bn: int, bk: int, split: int, stages: int, warps: int):
        self.m, self.n, self.k, self.bm, self.bn, self.bk = m, n, k, bm, bn, bk
        self.stages, self.warps = stages, warps
        steps = math.ceil(k / bk)
        self.k_per_split = math.ceil(steps / split) * bk
        self.split = math.ceil(k / self.k_per_split)
        self.tiles = math.ceil(m / bm) * math.ceil(n / bn)
        self.part = torch.empty(self.split * m * n if self.split > 1 else 1, device="cuda", dtype=torch.float32)
        self.count = torch.zeros(self.tiles, device="cuda", dtype=torch.int32)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _gemm[(self.tiles, self.split)](x, w, y, self.part, self.count, self.m, self.n, self.k, self.k_per_split,
                                         self.split, BM=self.bm, BN=self.bn, BK=self.bk,
                                         num_stages=self.stages, num_warps=self.warps)
        return y


def case(n: int, k: int, m: int, bandwidth: float) -> dict:
    nbytes = n * k * 2
    copies = max(2, math.ceil(CACHE_BYTES / nbytes))
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    weights = [torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k ** 0.5
               for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, weights[0]).float()
    moved = nbytes + 2 * m * (k + n)

    def share(ms: float) -> float:
        return round(moved / (ms * 1e-3) / bandwidth, 3)

    cublas = graph_ms(lambda i: torch.matmul(x, weights[i].t(), out=y), copies, rep=40)
    out = {"n": n, "k": k, "m": m, "mb": round(nbytes / 2**20, 1), "cublas_ms": round(cublas, 4),
           "cublas_of_bw": share(cublas), "configs": []}
    bm = 16 if m <= 16 else min(64, triton.next_power_of_2(m))
    best = None
    for bn, bk, stages, warps in TILES:
        for split in SPLITS:
            tiles = math.ceil(m / bm) * math.ceil(n / bn)
            if split > 1 and (k // split < bk or tiles >= 2 * PROGRAMS or tiles * split > 8 * PROGRAMS):
                continue  # a split only where the tiles alone are too few programs
            gemm = SplitGemm(m, n, k, bm, bn, bk, split, stages, warps)
            if split > 1 and gemm.split == 1:
                continue
            try:
                got = gemm(x, weights[0], y).float()
                err = ((got - ref).norm() / ref.norm()).item()
                ms = graph_ms(lambda i, g=gemm: g(x, weights[i], y), copies, rep=30)
            except Exception as exc:  # noqa: BLE001 (a config out of resources is reported, not fatal)
                out["configs"].append({"tiles": [bm, bn, bk, stages, warps], "split": split, "error": repr(exc)[:120]})
                continue
            row = {"tiles": [bm, bn, bk, stages, warps], "split": gemm.split, "programs": gemm.tiles * gemm.split,
                   "ms": round(ms, 4), "of_bw": share(ms), "rel_err": float(f"{err:.2e}")}
            out["configs"].append(row)
            if err < 1e-2 and (best is None or ms < best["ms"]):
                best = row
    out["best"] = best
    weights.clear()
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="v2lite,v3")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    report: dict = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": round(bandwidth / 1e9), "models": {}}
    print(f"{report['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    for model in args.models.split(","):
        cases, step = [], {}
        for m in ROWS[model]:
            cub = tri = 0.0
            for name, n, k, count in SHAPES[model]:
                row = case(n, k, m, bandwidth)
                row["name"] = name
                cases.append(row)
                best = row["best"]
                cub += count * row["cublas_ms"]
                tri += count * min(row["cublas_ms"], best["ms"] if best else math.inf)
                print(f"{model} m={m:3d} {name:15s} {row['mb']:7.1f} MB  cuBLAS {row['cublas_ms']:.4f} ms "
                      f"({row['cublas_of_bw']:.0%})  best {best and best['ms']} ms ({best and best['of_bw']}) "
                      f"{best and best['tiles']} split {best and best['split']}", flush=True)
            step[m] = {"cublas_ms": round(cub, 3), "with_best_ms": round(tri, 3)}
            print(f"{model} m={m}: a step's dense GEMMs cuBLAS {cub:.3f} ms, with the best of each {tri:.3f} ms",
                  flush=True)
        report["models"][model] = {"cases": cases, "step": step}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
