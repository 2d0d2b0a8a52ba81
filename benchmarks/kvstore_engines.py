"""bench_kvstore.py's engines: build one from the benchmark's arguments, time a prompt's first token, close it
and give its device memory back, and seed the store with prefixes."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams

SUFFIX = 16


def ttft(engine: Engine, ids: list[int]) -> float:
    """Seconds from add_request to the first token (admission, i.e. any load, included)."""
    rid = f"t{time.monotonic_ns()}"
    start = time.perf_counter()
    engine.add_request(rid, prompt_token_ids=ids, params=SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def rand(gen: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def make(args: argparse.Namespace, **kw) -> Engine:
    base = dict(model=args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
                skip_tokenizer_init=True, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, max_model_len=args.max_model_len,
                allow_long_max_model_len=True,  # the embedded model's 512 positions stretched: timing only
                kv_layerwise=getattr(args, "kv_layerwise", False), kv_store_connections=args.store_connections)
    base.update(kw)
    e = Engine(EngineConfig(**base))
    ttft(e, [1, 2, 3])  # warm-up
    return e


def release(e: Engine) -> None:
    """Close an engine and give its device memory back before the next one starts (the caller drops its
    own reference right after: ``release(e); del e``)."""
    import gc

    device = e.config.torch_device
    e.close()
    del e
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flush(e: Engine) -> None:
    mover = getattr(e.kv.connector.transport, "mover", None) if e.kv.connector else None
    if mover is not None:
        mover.flush(120)


def seed_store(args, url: str, salt: str, count: int, length: int,
               gen: torch.Generator) -> tuple[list[list[int]], int, int, int]:
    """``count`` random prefixes of ``length`` tokens written to the store by an engine closed afterwards ->
    (the prefixes, the vocabulary size, the block size, the cache bytes per token)."""
    # write slots for a whole prompt: with the default 256 MiB a 32k-token V2-Lite prompt (about 1 GB) kept only
    # the blocks its first prefill step saved, the writer being slower than the prefill (on a GPU the 32k store
    # hits loaded 8k tokens each and recomputed the rest)
    a = make(args, kv_store=url, kv_host_memory=0, kv_store_salt=salt,
             kv_store_write_buffer=max(256 << 20, (length + SUFFIX) * latent_bytes_per_token(args) * 5 // 4))
    vocab, bs = a.model_config.vocab_size, a.config.effective_block_size
    per_token = a.executor.runner.cache_bytes_per_token
    prefixes = [rand(gen, vocab, length) for _ in range(count)]
    for p in prefixes:
        ttft(a, p + rand(gen, vocab, SUFFIX))
    flush(a)
    dropped = a.kv.connector.snapshot()["writes_dropped"]
    release(a)
    if dropped:
        print(f"warning: {dropped} blocks of the seeded prefixes were not stored (write buffer full)", file=sys.stderr)
    return prefixes, vocab, bs, per_token


def latent_bytes_per_token(args) -> int:
    """The cache bytes of one token over all layers, from the checkpoint's config, at 4 bytes a value (float32;
    an upper bound for bf16 caches)."""
    from moeserve.coordinator.config import default_model_path
    from moeserve.model.config import ModelConfig

    config = ModelConfig.from_hf(args.model or default_model_path())
    return config.num_hidden_layers * config.kv_cache_dim * 4
