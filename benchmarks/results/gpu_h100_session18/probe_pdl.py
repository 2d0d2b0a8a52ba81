"""Does programmatic dependent launch (PDL) shorten a chain of small dependent weight-streaming kernels?

A chain like a decode step at batch 1: x_{i+1} = W_i x_i over `--layers` distinct [N, K] bf16 weights (more
than the L2), each product one launch. Variants, each replayed from one CUDA graph (and also plain stream):
  cublas      torch.matmul
  triton      a split-K-free GEMV kernel (tl.dot, 16-row tile), no PDL
  pdl         the same launched with launch_pdl=True; gdc_wait() first, gdc_launch_dependents() first
  pdl_pre     launch_pdl=True; the first weight tile is loaded before gdc_wait() (weights do not depend on the
              previous kernel), gdc_launch_dependents() first
Reports us per link of the chain and checks each variant's result against cublas.
"""
import json
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr, PRE: tl.constexpr,
          L2: tl.constexpr = False, KP: tl.constexpr = 64):
    pn = tl.program_id(0)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm = tl.arange(0, 16)
    acc = tl.zeros((16, BN), tl.float32)
    if PDL:
        gdc_launch_dependents()
    if L2:  # the program's whole weight slice into the L2, 128 bytes a prefetch, before waiting
        lines = tl.minimum(tl.arange(0, KP) * 64, K - 64)
        ptrs = w_ptr + rn[:, None] * K + lines[None, :]
        tl.inline_asm_elementwise("mov.u32 $0, 0; prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)
    if PRE:
        b0 = tl.load(w_ptr + rn[None, :] * K + rk[:, None])
        gdc_wait()
        a0 = tl.load(x_ptr + rm[:, None] * 0 + rk[None, :], mask=rm[:, None] < 1, other=0.0)
        acc = tl.dot(a0, b0, acc)
        start = BK
    else:
        if PDL:
            gdc_wait()
        start = 0
    for k in range(start, K, BK):
        a = tl.load(x_ptr + rm[:, None] * 0 + (k + rk)[None, :], mask=rm[:, None] < 1, other=0.0)
        b = tl.load(w_ptr + rn[None, :] * K + (k + rk)[:, None])
        acc = tl.dot(a, b, acc)
    y = tl.sum(acc, 0)  # row 0 only holds data
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty))


def run(variant, ws, xs, bn, bk, stages):
    """One pass of the chain with ``variant``'s kernels."""
    for i, w in enumerate(ws):
        nn_, kk = w.shape
        x, y = xs[i][:kk], xs[i + 1][:nn_]
        if variant == "cublas":
            torch.matmul(x.view(1, -1), w.t(), out=y.view(1, -1))
        else:
            pdl = variant.startswith("pdl")
            kw = {"launch_pdl": True} if pdl else {}
            _gemv[(nn_ // bn,)](x, w, y, nn_, kk, BN=bn, BK=bk, PDL=pdl, PRE=variant == "pdl_pre",
                                L2=variant == "pdl_l2", KP=triton.next_power_of_2(kk // 64),
                                num_warps=4, num_stages=stages, **kw)


def main():
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    out = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__}
    for n, k, bn, bk, stages in ((2048, 2048, 32, 256, 4), (3584, 2048, 32, 256, 4), (2816, 2048, 32, 256, 4)):
        ws = [torch.randn(*((n, k) if i % 2 == 0 else (k, n)), device="cuda", dtype=torch.bfloat16) / 45
              for i in range(layers)]  # alternating shapes: each link's output is the next one's input
        xs = [torch.zeros(max(n, k), device="cuda", dtype=torch.bfloat16) for _ in range(layers + 1)]
        xs[0][:k].copy_(torch.randn(k, device="cuda"))

        res = {}
        ref = None
        for variant in ("cublas", "triton", "pdl", "pdl_pre", "pdl_l2") * 2:
            try:
                run(variant, ws, xs, bn, bk, stages)
                torch.cuda.synchronize()
                got = xs[-1].float().clone()
                if ref is None:
                    ref = got
                err = float((got - ref).norm() / ref.norm())
                args = (variant, ws, xs, bn, bk, stages)
                stream_ms = triton.testing.do_bench(lambda a=args: run(*a), warmup=10, rep=100, return_mode="median")
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run(variant, ws, xs, bn, bk, stages)
                graph_ms = triton.testing.do_bench(g.replay, warmup=10, rep=200, return_mode="median")
                g.replay()
                torch.cuda.synchronize()
                gerr = float((xs[-1].float() - ref).norm() / ref.norm())
                res.setdefault(variant, []).append({"stream_us_per_link": round(stream_ms * 1e3 / layers, 2),
                                                    "graph_us_per_link": round(graph_ms * 1e3 / layers, 2),
                                                    "rel_err": err, "graph_rel_err": gerr})
            except Exception as e:  # noqa: BLE001
                res.setdefault(variant, []).append({"error": repr(e)[:300]})
        out[f"{n}x{k}"] = res
        print(f"{n}x{k}", json.dumps(res), flush=True)
    json.dump(out, open(sys.argv[2] if len(sys.argv) > 2 else "/dev/null", "w"), indent=1)


if __name__ == "__main__":
    main()
