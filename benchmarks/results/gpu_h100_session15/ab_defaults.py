"""The split-K MoE launches at their default tiles, for whichever moeserve is first on the path (session 15's
A/B of two checkouts in one lease): ms a layer and GB/s over the experts reached, at a few token counts.

    PYTHONPATH=<checkout>:<checkout>/benchmarks python ab_defaults.py <label> <out.json>
"""

import json
import sys

import bench_moe_kernels as bm
import torch

from moeserve.kernels import moe_gemv as mg

out = {"code": sys.argv[1], "device": torch.cuda.get_device_name(), "gemv": []}
for shape, tokens in (("v2lite", (1, 4)), ("v3", (8, 16, 32))):
    ex = bm.Experts(shape)
    for t in tokens:
        _, _, ids = ex.case(t)
        reached = ex.reached_bytes(ids)
        if hasattr(mg, "gemv_configs"):
            c1, c2 = mg.gemv_configs(t * ex.top_k, ex.fp8)
        else:  # the checkout before gemv_configs
            c1, c2 = (mg.FP8_GATE_UP, mg.FP8_DOWN) if ex.fp8 else (mg.GATE_UP, mg.DOWN)
        ms = min(bm.run_gemv(ex, t, c1, c2) for _ in range(3))
        row = {"shape": shape, "tokens": t, "ms": round(ms, 4), "gb_s": round(reached / ms / 1e6, 1)}
        print(json.dumps(row), flush=True)
        out["gemv"].append(row)
    del ex
    torch.cuda.empty_cache()
with open(sys.argv[2], "w") as f:
    json.dump(out, f, indent=1)
