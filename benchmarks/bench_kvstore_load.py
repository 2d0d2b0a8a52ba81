"""Store load rate alone: a prefix's stored blocks into a rank's cache, old path against new, in one run.

Starts its own ``redis-server`` on a free loopback port, stores ``--prefix-len`` tokens of random latent in
blocks of the given model shape, then loads them ``--repeats`` times with each path, interleaved:

- ``redis-py``: the path before issue 21 (one ``MGET`` through redis-py + hiredis, each value parsed into a
  new ``bytes``, checked, copied into a host buffer, then into the cache; on an accelerator through a pinned
  buffer and a transposed staging copy). Kept here, as it was, as the baseline.
- ``in-place xN``: kvstore/store_load.py: chunks read in parallel over N connections, each value received
  with ``recv_into`` into the cache rows (CPU) or a pinned staging slot sent to the device as it arrives.
- ``layer-wise xN`` (``--layerwise``): the same loader's layer-wise load, a group of layers at a time.

``--busy F`` runs a Python thread beside the readers that holds the GIL a fraction F of the time (an engine
loop's stand-in): every socket call, checksum update and torch op of a reader lets go of the GIL, and taking it
back can wait for a switch interval. ``--block-tokens N`` stores the same bytes in values of N tokens (several
blocks per key, as the store could hold them). GB/s counts the latent bytes loaded. Shapes: ``v2-lite`` (27 layers, 576 values, bf16, 64-token blocks: 1.99
MB a block), ``embedded`` (the CPU test model: 5 layers, 128 values, float32, 16-token blocks: 40 KB).

    PYTHONPATH=. python benchmarks/bench_kvstore_load.py --shape embedded --prefix-len 2048
    PYTHONPATH=. python benchmarks/bench_kvstore_load.py --shape v2-lite --prefix-len 8192
    PYTHONPATH=. python benchmarks/bench_kvstore_load.py --device cuda --shape v2-lite --prefix-len 32768
    PYTHONPATH=. python benchmarks/bench_kvstore_load.py --shape v2-lite --prefix-len 4096 --busy 1 --skip-redis-py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisServer  # noqa: E402

from moeserve.device_copy import to_device  # noqa: E402
from moeserve.kvstore.block_format import BlockLayout, decode_block, encode_block  # noqa: E402
from moeserve.kvstore.latent_cache import allocate_latent_caches  # noqa: E402
from moeserve.kvstore.prefix import block_hashes  # noqa: E402
from moeserve.kvstore.store import KVStore  # noqa: E402
from moeserve.kvstore.store_load import StoreLoader  # noqa: E402
from moeserve.kvstore.tier_setup import open_store  # noqa: E402

SHAPES = {"v2-lite": (27, 576, "bfloat16", 64), "embedded": (5, 128, "float32", 16)}


def old_path(store: KVStore, layout: BlockLayout, caches: list[torch.Tensor], hashes, tokens, blocks) -> int:
    """The load before issue 21 (mover.read_blocks + BlockMover._to_device), as it was."""
    device, pin = caches[0].device, caches[0].device.type != "cpu"
    buf = torch.empty((len(hashes), len(caches), *caches[0].shape[1:]), dtype=caches[0].dtype, pin_memory=pin)
    values = store.get([layout.key(h) for h in hashes])
    for i, (h, toks, value) in enumerate(zip(hashes, tokens, values)):
        payload, why = decode_block(value, layout, h, toks)
        assert payload is not None, why
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(payload, dtype=torch.uint8)
        buf[i].view(torch.uint8).view(-1).copy_(src)
    idx = to_device(torch.tensor(list(blocks)), device)
    data = buf
    if pin:
        staged = torch.empty((len(caches), data.shape[0], *data.shape[2:]), dtype=data.dtype, pin_memory=True)
        staged.copy_(data.transpose(0, 1))
        data = staged.transpose(0, 1)
    for j, cache in enumerate(caches):
        cache.index_copy_(0, idx, data[:, j].to(device, non_blocking=pin))
    if pin:
        torch.accelerator.synchronize(device)
    return len(hashes)


def hold_gil(fraction: float, stop: threading.Event, work: list[int]) -> None:
    """Pure Python work ``fraction`` of the time, in 4 ms spans, until ``stop``: what an engine's loop does to
    threads that need the GIL back after each socket call or torch op. ``work[0]`` counts the loops done (how
    much the readers slow the busy thread down)."""
    x, span = 0, 0.004
    while not stop.is_set():
        end = time.perf_counter() + span
        while time.perf_counter() < end:
            for i in range(100):
                x += i
            work[0] += 1
        if fraction < 1:
            time.sleep(span * (1 - fraction) / fraction)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=SHAPES, default="embedded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--connections", default="1,2,4")
    p.add_argument("--redis-io-threads", type=int, default=1,
                   help="redis-server's io-threads (1: its default, one thread sends every reply)")
    p.add_argument("--servers", type=int, default=1,
                   help="redis-servers the keys are spread over (--kv-store URL,URL,...; each its own thread)")
    p.add_argument("--busy", type=float, default=0.0,
                   help="a Python thread beside the readers, holding the GIL this fraction of the time (the engine "
                        "loop's stand-in: busy in 4 ms spans; 1: never waits); 0: none")
    p.add_argument("--skip-redis-py", action="store_true", help="leave out the old path")
    p.add_argument("--layerwise", action="store_true",
                   help="also a layer-wise load over each connection count (StoreLoader.load_layers: the layers in "
                        "groups, each group's slice of every value read with GETRANGE)")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval for the run (seconds; Python's default is 0.005)")
    p.add_argument("--block-tokens", type=int, default=0,
                   help="tokens a stored value holds (default: the shape's block size): the same bytes in fewer, "
                        "larger values, as several blocks per key would store them")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    layers, dim, dtype_name, bs = SHAPES[args.shape]
    bs = args.block_tokens or bs
    dtype = getattr(torch, dtype_name)
    device = torch.device(args.device)
    n = args.prefix_len // bs
    layout = BlockLayout("0" * 32, dtype_name, bs, 0, 0, layers, dim)
    # laid out as the engine's (views of one tensor): a chunk's blocks go to every layer in one op
    caches = list(allocate_latent_caches(list(range(layers)), n + 1, bs, dim, dtype, device).values())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100_000, (n * bs,), generator=gen).tolist()
    hashes = block_hashes(ids, bs)
    tokens = [ids[i * bs:(i + 1) * bs] for i in range(n)]
    latent = torch.randn(n, layers, bs, dim, generator=gen).to(dtype)
    blocks = list(range(1, n + 1))
    with ExitStack() as servers:
        urls = []
        for _ in range(args.servers):
            server = servers.enter_context(RedisServer(Path(tempfile.mkdtemp()), io_threads=args.redis_io_threads))
            server.cli("config", "set", "maxmemory", "0")
            urls.append(server.url)
        store = open_store(",".join(urls), timeout_s=30.0,
                           read_connections=max(map(int, args.connections.split(","))))
        raw = latent.view(torch.uint8).reshape(n, -1).numpy()
        for lo in range(0, n, 16):
            store.put([(layout.key(hashes[i]), encode_block(layout, hashes[i], tokens[i], raw[i].data))
                       for i in range(lo, min(n, lo + 16))])
        paths = {} if args.skip_redis_py else {
            "redis-py": lambda: old_path(store, layout, caches, hashes, tokens, blocks)}
        for c in map(int, args.connections.split(",")):
            loader = StoreLoader(caches, layout, store, c)
            paths[f"in-place x{c}"] = lambda loader=loader: loader.load(hashes, tokens, blocks).num_ok
            if args.layerwise:
                paths[f"layer-wise x{c}"] = lambda loader=loader: loader.load_layers(hashes, tokens, blocks,
                                                                                     lambda _: None).num_ok
        times: dict[str, list[float]] = {name: [] for name in paths}
        stop = threading.Event()
        work = [0]
        busy = threading.Thread(target=hold_gil, args=(args.busy, stop, work), daemon=True) if args.busy > 0 else None
        if busy is not None:
            busy.start()
        started = time.perf_counter()
        for _ in range(args.repeats):
            for name, run in paths.items():
                for cache in caches:
                    cache.zero_()
                start = time.perf_counter()
                assert run() == n
                times[name].append(time.perf_counter() - start)
                want = latent[:, 0].to(device)
                assert torch.equal(caches[0][1:n + 1], want), name  # every path loads the same bytes
        stop.set()
        busy_loops_per_s = work[0] / (time.perf_counter() - started)
    nbytes = n * layout.payload_bytes
    result = {"shape": args.shape, "device": args.device, "prefix_len": args.prefix_len, "blocks": n,
              "block_tokens": bs, "value_bytes": layout.payload_bytes, "busy": args.busy,
              "switch_interval_s": sys.getswitchinterval(), "busy_loops_per_s": busy_loops_per_s,
              "servers": args.servers, "redis_io_threads": args.redis_io_threads,
              "latent_bytes": nbytes,
              "paths": {name: {"median_s": statistics.median(t), "gb_per_s": nbytes / statistics.median(t) / 1e9}
                        for name, t in times.items()}}
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
