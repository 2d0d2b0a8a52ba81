"""The few-row dense kernels (``kernels/dense_gemv.py``) against the library ops they replace, on one GPU, at
the decode shapes of DeepSeek-V2-Lite and V3 (bf16): ``dense_gemv`` vs ``F.linear`` and ``bmm_small`` vs
``torch.bmm`` (x and out strided as ``MLA._decode`` passes them), at each row count of ``--rows``.

Every timing replays a CUDA graph of one call per weight copy over enough copies (more than 400 MB in all)
that no call finds its weight in the 50 MB L2; median of ``triton.testing.do_bench``, microseconds a call.
Bandwidth counts the weight's bytes (x and y are a rounding error); the device-to-device copy bandwidth is
measured first and each op is reported against it. ``--sweep`` also times the tiles around ``config_for``'s
(``bmm_config_for``'s) choice at every case and prints the best.

    python benchmarks/bench_dense_gemv.py --json-out dense_gemv.json
    python benchmarks/bench_dense_gemv.py --shapes v2lite --rows 1 --sweep
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
import triton

from moeserve.kernels.dense_gemv import bmm_config_for, bmm_small, config_for, dense_gemv

SHAPES = {  # name: ([(layer, N, K)] of the F.linear weights, [(layer, heads, K, N)] of the bmm weights)
    "v2lite": ([("q_kv_a", 3648, 2048), ("o_proj", 2048, 2048)],
               [("w_uk", 16, 128, 512), ("w_uv", 16, 512, 128)]),
    "v3": ([("q_kv_a", 2112, 7168), ("q_b", 24576, 1536), ("o_proj", 7168, 16384)],
           [("w_uk", 128, 128, 512), ("w_uv", 128, 512, 128)]),
}
STREAM_BYTES = 400e6  # bytes of weight copies a graph cycles through: well past the L2
# (BLOCK_N, num_warps) pairs the sweep tries, each at every step length and stage count
TILES = [(4, 1), (8, 1), (16, 1), (16, 2), (32, 2), (32, 4)]


def graph_ms(fn, calls: int, rep: int = 100) -> float:
    """Median ms of one call of ``fn(i)`` for i in range(calls), replayed from one CUDA graph."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    return triton.testing.do_bench(graph.replay, warmup=20, rep=rep, return_mode="median") / calls


def copy_bandwidth() -> float:
    """Bytes per second of a 4 GiB device-to-device copy, counting bytes read and written."""
    a = torch.empty(1 << 31, dtype=torch.int16, device="cuda").random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=20, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3)


def weights(*shape: int) -> list[torch.Tensor]:
    """Enough distinct bf16 copies of a weight of ``shape`` to stream more than ``STREAM_BYTES``."""
    copies = max(2, math.ceil(STREAM_BYTES / (math.prod(shape) * 2)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [(torch.randn(*shape, device="cuda", generator=gen) / shape[-2] ** 0.5).bfloat16()
            for _ in range(copies)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


class Case:
    """One layer's op at one row count: ``kernel(i, config)`` and ``library(i)`` on weight copy i."""

    def __init__(self, shape: str, layer: str, rows: int, dense: tuple | None = None, bmm: tuple | None = None):
        self.shape, self.layer, self.rows = shape, layer, rows
        if dense is not None:
            n, k = dense
            self.ws = weights(n, k)
            self.x = torch.randn(rows, k, device="cuda").bfloat16()
            self.dims = {"n": n, "k": k}
            self.default = config_for(n, k)
        else:
            assert bmm is not None
            heads, k, n = bmm
            self.ws = weights(heads, k, n)
            self.x = torch.randn(rows, heads, k, device="cuda").bfloat16().transpose(0, 1)  # [H, B, K] view
            self.out = torch.empty(rows, heads, n, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
            self.dims = {"heads": heads, "k": k, "n": n}
            self.default = bmm_config_for(heads, n, k)
        self.dense = dense is not None
        self.bytes = self.ws[0].numel() * 2

    def kernel(self, i: int, config: tuple | None = None) -> torch.Tensor:
        if self.dense:
            return dense_gemv(self.x, self.ws[i], config=config)
        return bmm_small(self.x, self.ws[i], self.out, config=config)

    def library(self, i: int) -> torch.Tensor:
        if self.dense:
            return F.linear(self.x, self.ws[i])
        return torch.bmm(self.x, self.ws[i], out=self.out)

    def time_us(self, fn, rep: int = 100) -> float:
        return graph_ms(fn, len(self.ws), rep) * 1e3

    def row(self, bandwidth: float) -> dict:
        err = rel_err(self.kernel(0).clone(), self.library(0).clone())
        kernel_us = self.time_us(self.kernel)
        library_us = self.time_us(self.library)
        return {"shape": self.shape, "layer": self.layer, "op": "linear" if self.dense else "bmm",
                "rows": self.rows, **self.dims, "weight_mb": self.bytes / 1e6, "copies": len(self.ws),
                "config": list(self.default), "rel_err": err, "kernel_us": kernel_us, "library_us": library_us,
                "kernel_gb_s": self.bytes / kernel_us / 1e3, "library_gb_s": self.bytes / library_us / 1e3,
                "kernel_of_copy_bw": self.bytes / (kernel_us * 1e-6) / bandwidth,
                "library_of_copy_bw": self.bytes / (library_us * 1e-6) / bandwidth,
                "library_over_kernel": library_us / kernel_us}

    def sweep(self) -> dict:
        """Every tile of ``TILES`` at two step lengths (the whole reduction where shorter) and 3 / 4 stages: 256 /
        512 for ``dense_gemv``, 128 / 256 for ``bmm_small`` (whose N-major weight tiles of 512 spill registers)."""
        k = self.dims["k"]
        steps = (256, 512) if self.dense else (128, 256)
        candidates = {(bn, max(32, min(bk, triton.next_power_of_2(k))), nw, st)
                      for bn, nw in TILES for bk in steps for st in (3, 4)} | {self.default}
        timed = []
        for cfg in sorted(candidates):
            try:
                timed.append((self.time_us(lambda i, c=cfg: self.kernel(i, c), rep=50), cfg))
            except Exception as e:  # a tile the GPU cannot hold (shared memory): not a candidate here
                print(f"# {cfg}: {type(e).__name__}", file=sys.stderr)
        timed.sort()
        default_us = next(us for us, cfg in timed if cfg == self.default)
        return {"default": list(self.default), "default_us": default_us, "best": list(timed[0][1]),
                "best_us": timed[0][0], "best_gb_s": self.bytes / timed[0][0] / 1e3,
                "top5": [(round(us, 2), list(cfg)) for us, cfg in timed[:5]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="v2lite,v3", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--rows", default="1,2,4", help="rows of x (decode batch sizes), comma-separated")
    parser.add_argument("--sweep", action="store_true", help="also time the tiles around the default config "
                        "of every case and print the best")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    result: dict = {"device": torch.cuda.get_device_name(), "copy_bw_gb_s": bandwidth / 1e9, "cases": []}
    print(f"# {result['device']}: device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    for shape in args.shapes.split(","):
        dense, bmm = SHAPES[shape]
        layers = [(name, {"dense": (n, k)}) for name, n, k in dense] + \
            [(name, {"bmm": (h, k, n)}) for name, h, k, n in bmm]
        for name, dims in layers:
            for rows in (int(r) for r in args.rows.split(",")):
                case = Case(shape, name, rows, **dims)
                row = case.row(bandwidth)
                print(f"{shape:6} {name:6} {row['op']:6} M={rows} {row['weight_mb']:6.1f} MB  kernel "
                      f"{row['kernel_us']:7.2f} us {row['kernel_gb_s']:5.0f} GB/s ({row['kernel_of_copy_bw']:4.0%})  "
                      f"library {row['library_us']:7.2f} us {row['library_gb_s']:5.0f} GB/s "
                      f"({row['library_of_copy_bw']:4.0%})  library/kernel {row['library_over_kernel']:.2f}x  "
                      f"config {tuple(row['config'])}  rel_err {row['rel_err']:.1e}", flush=True)
                if args.sweep:
                    row["sweep"] = case.sweep()
                    s = row["sweep"]
                    print(f"  sweep: best {tuple(s['best'])} {s['best_us']:.2f} us ({s['best_gb_s']:.0f} GB/s), "
                          f"default {tuple(s['default'])} {s['default_us']:.2f} us; top5 {s['top5']}", flush=True)
                result["cases"].append(row)
                del case
                torch.cuda.empty_cache()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
