"""Does a small copy on the step's stream wait behind a big copy on another stream? (copy engines)"""
import json
import time

import torch

dev = torch.device("cuda")
N = 256 << 20
big = torch.empty(N, dtype=torch.uint8, device=dev)
host_big = torch.empty(N, dtype=torch.uint8, pin_memory=True)
small = torch.zeros(64, device=dev)
host_small = torch.empty(64, pin_memory=True)
side = torch.cuda.Stream()
a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
out = {}

def trial(direction, chunk, compute_ms):
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        for off in range(0, N, chunk or N):
            n = chunk or N
            if direction == "d2h":
                host_big[off:off + n].copy_(big[off:off + n], non_blocking=True)
            else:
                big[off:off + n].copy_(host_big[off:off + n], non_blocking=True)
    t0 = time.perf_counter()
    # the step: some compute, then its small copy out (and in)
    for _ in range(compute_ms):
        a @ a  # ~0.14 ms each on H100 at 4096^3 bf16? measured below
    if direction == "d2h":
        host_small.copy_(small, non_blocking=True)
    else:
        small.copy_(host_small, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    ev.synchronize()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t0) * 1e3

for _ in range(3):
    trial("d2h", 0, 1)
# compute alone
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(20):
    a @ a
torch.cuda.synchronize()
out["matmul_ms"] = (time.perf_counter() - t0) / 20 * 1e3
for direction in ("d2h", "h2d"):
    for compute in (0, 10):
        for chunk in (0, 16 << 20, 4 << 20, 1 << 20):
            r = [trial(direction, chunk, compute) for _ in range(5)]
            out[f"{direction} compute{compute} chunk{chunk >> 20}MB"] = {
                "small_done_ms": sorted(x[0] for x in r)[2], "all_done_ms": sorted(x[1] for x in r)[2]}
print(json.dumps(out, indent=1))
