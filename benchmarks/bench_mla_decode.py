"""Paged MLA decode (kernels/mla_decode.py): tiles, pipeline stages and split counts, swept per step shape.

For DeepSeek-V2-Lite's 16 heads (batch 64, 256) and V3's 128 heads (batch 32), kv_lora_rank 512 +
rope 64, bf16, every sequence 1024 cached tokens (the decode profiles' context) in 64-row pages scattered
over a cache larger than the L2: each configuration's kernel pair (split, merge) is replayed from a CUDA
graph over ``--layers`` caches, median of ``triton.testing.do_bench``. Reported: ms per layer, and the cache
bytes read (batch x context x 576 x 2) against the device-to-device copy bandwidth measured first. The
default configuration is checked against the eager reference once per shape. The pages are scattered at
random: a configuration that wins here must still win in the engine's decode profile (profile_decode.py)
before it becomes the default; the 8-12% of 64-row steps found here did not (BENCHMARKS.md). GPU only:

    python benchmarks/bench_mla_decode.py --json-out mla_decode.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from bench_moe_kernels import copy_bandwidth, graph_ms

from moeserve.kernels.mla_decode import DEFAULT, DecodeConfig, config_for, mla_decode

SHAPES = {"v2lite": (16, (64, 256)), "v3": (128, (32,)),  # name: (heads, batches): the decode targets' sizes
          "v2lite-small": (16, (1, 4)), "v3-small": (128, (1, 4))}
LATENT, ROPE, PAGE, CONTEXT = 512, 64, 64, 1024
# 16-row steps with 3-4 stages keep more cache rows in flight per program at fewer registers (two programs a
# multiprocessor at the default's 206 registers and 56 KB of shared memory); 2 warps give each warp more columns
CANDIDATES = [DecodeConfig(t, w, st, fill) for t in (16, 32, 64) for w in (2, 4, 8) for st in (2, 3, 4)
              for fill in (2, 4) if not (t == 64 and st == 4)]
# more heads a program for V3's 128 (a tensor-core product's M of 32 or 64 instead of 16)
WIDE_HEADS = [DecodeConfig(t, w, st, 2, hb) for hb in (32, 64) for t in (32, 64) for w in (4, 8) for st in (2, 3)]
# a few sequences: more, shorter pieces (up to 64 splits of 16-32 rows), so that a step's latency is one or two
# loop steps of many programs instead of several of a few
SMALL_BATCH = [DecodeConfig(t, 4, st, 2, hb, ms) for hb in (16, 64) for t in (16, 32) for st in (1, 2)
               for ms in (16, 32, 64)]
L2_BYTES = 60 << 20  # more than an H100's or H200's L2: the caches a sweep cycles through add up to more


def case(heads: int, batch: int, layers: int):
    gen = torch.Generator(device="cuda").manual_seed(batch)
    pages = batch * CONTEXT // PAGE
    caches = [torch.randn(pages * PAGE * 2, LATENT + ROPE, device="cuda", generator=gen, dtype=torch.bfloat16)
              for _ in range(layers)]
    tables = torch.randperm(2 * pages, device="cuda", generator=gen)[:pages].view(batch, -1).to(torch.int32)
    lens = torch.full((batch,), CONTEXT, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, LATENT + ROPE, device="cuda", generator=gen, dtype=torch.bfloat16)
    return q, caches, tables, lens


def eager(q, cache, tables, lens, scale):
    rows = cache.view(-1, PAGE, LATENT + ROPE)[tables.long()].flatten(1, 2).float()  # [B, L, D]
    s = torch.einsum("bhd,bld->bhl", q.float(), rows) * scale
    return torch.einsum("bhl,bld->bhd", s.softmax(-1), rows[..., :LATENT])


def sweep(heads: int, batch: int, layers: int, bandwidth: float) -> dict:
    q, caches, tables, lens = case(heads, batch, layers)
    scale = (192 ** -0.5)
    ref = eager(q, caches[0], tables, lens, scale)
    err = float((mla_decode(q, caches[0], tables, lens, PAGE, LATENT, scale).float() - ref).norm() / ref.norm())
    read = batch * CONTEXT * (LATENT + ROPE) * 2
    timed = []
    if batch <= 4:  # a few sequences: the default and the many-split tiles
        configs = [DEFAULT] + ([config_for(heads, batch)] if heads >= 64 else []) \
            + [c for c in SMALL_BATCH if c.head_block <= heads]
    else:
        configs = CANDIDATES + (WIDE_HEADS if heads >= 64 else [])
    for cfg in configs:
        try:
            ms = graph_ms(lambda i, c=cfg: mla_decode(q, caches[i], tables, lens, PAGE, LATENT, scale, config=c),
                          layers, rep=60)
        except Exception as e:  # a tile that does not fit (registers, shared memory)
            print(f"# {cfg}: {type(e).__name__}", file=sys.stderr)
            continue
        timed.append((ms, cfg))
    default_ms = next(ms for ms, c in timed if c == config_for(heads, batch))
    best_ms, best = min(timed, key=lambda t: t[0])
    row = {"heads": heads, "batch": batch, "rel_err_default": err, "default_ms": default_ms,
           "default_of_copy_bw": read / (default_ms * 1e-3) / bandwidth, "best": vars(best), "best_ms": best_ms,
           "best_of_copy_bw": read / (best_ms * 1e-3) / bandwidth,
           "top5": [(round(ms, 4), vars(c)) for ms, c in sorted(timed, key=lambda t: t[0])[:5]]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="v2lite,v3")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    result: dict = {"device": torch.cuda.get_device_name(), "copy_bw_gb_s": copy_bandwidth() / 1e9, "rows": []}
    for shape in args.shapes.split(","):
        heads, batches = SHAPES[shape]
        for b in batches:  # enough caches that a replay reads them from HBM, not the L2
            layers = max(args.layers, -(-L2_BYTES // (b * CONTEXT * (LATENT + ROPE) * 2)))
            result["rows"].append(sweep(heads, b, layers, result["copy_bw_gb_s"] * 1e9))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
