"""Time to first token of a cold batch (no prefix in the cache), repeated in one engine: is the first batch
after start any slower than the next ones?

Builds the engine on dummy weights, then ``--repeats`` times queues ``--prompts`` prompts of ``--input-len``
fresh random tokens at once and steps until every one has its first token; prints each round's time, and
the Triton kernels compiled during the build and during each round (by name, counted in the Triton cache).
With ``--fresh-triton-cache`` the cache starts empty, as on a new machine: a round that compiles kernels
the start-up warm-up did not build is slower than the next one.

    python benchmarks/ttft_cold.py --model benchmarks/configs/deepseek_v3_6l --prompts 32 --input-len 1024
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import tempfile
import time

import torch


def cold_round(engine, prompts: int, input_len: int, seed: int) -> float:
    from moeserve.coordinator.sampling import SamplingParams

    gen = torch.Generator().manual_seed(1000 + seed)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i in range(prompts):
        ids = torch.randint(0, engine.model_config.vocab_size, (input_len,), generator=gen).tolist()
        engine.add_request(f"r{seed}-{i}", prompt_token_ids=ids, params=params)
    start = time.perf_counter()
    waiting = {f"r{seed}-{i}" for i in range(prompts)}
    while waiting:
        for out in engine.step():
            waiting.discard(out.request_id)
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return elapsed


def compiled_kernels(cache_dir: pathlib.Path) -> collections.Counter:
    """Kernel name -> how many compiled variants the Triton cache holds (one ``<name>.json`` each)."""
    return collections.Counter(p.stem for p in cache_dir.glob("*/*.json") if not p.stem.startswith("__grp__"))


def new_since(cache_dir: pathlib.Path, before: collections.Counter) -> dict[str, int]:
    now = compiled_kernels(cache_dir)
    return dict(sorted((now - before).items()))


class CompileLog:
    """Each Triton compile's kernel name and specialization, by phase (Triton's JIT cache hook)."""

    def __init__(self) -> None:
        self.phase = "build"
        self.events: dict[str, list[str]] = collections.defaultdict(list)
        try:
            from triton import knobs
            knobs.runtime.jit_cache_hook = self._hook
        except (ImportError, AttributeError):  # older Triton
            from triton.runtime.jit import JITFunction
            JITFunction.cache_hook = self._hook

    def _hook(self, *args, **kwargs) -> bool:
        if not kwargs.get("already_compiled", False):
            name = str(kwargs.get("repr", "?")).split("(")[0]
            detail = kwargs.get("compile") or {}
            self.events[self.phase].append(f"{name} signature={detail.get('signature')} "
                                           f"constants={detail.get('constants')} attrs={detail.get('configs')}")
        return False


def main() -> None:
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/configs/deepseek_v2_lite")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fresh-triton-cache", action="store_true", help="start from an empty Triton cache")
    args = p.parse_args()
    if args.fresh_triton_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")
    cache_dir = pathlib.Path(os.environ.get("TRITON_CACHE_DIR", pathlib.Path.home() / ".triton" / "cache"))
    seen = compiled_kernels(cache_dir)
    log = CompileLog()
    start = time.perf_counter()
    engine = Engine(EngineConfig(model=args.model, device="cuda", load_format="dummy", skip_tokenizer_init=True))
    build_s = time.perf_counter() - start
    compiled = {"build": new_since(cache_dir, seen)}
    rounds = []
    for r in range(args.repeats):
        seen = compiled_kernels(cache_dir)
        log.phase = f"round {r}"
        rounds.append(cold_round(engine, args.prompts, args.input_len, r))
        compiled[f"round {r}"] = new_since(cache_dir, seen)
    late = {e.split("[")[0] for phase, events in log.events.items() if phase != "build" for e in events}
    print(json.dumps({"model": args.model, "prompts": args.prompts, "input_len": args.input_len,
                      "build_s": round(build_s, 1), "last_first_token_s": [round(r, 3) for r in rounds],
                      "prompt_tok_s": [round(args.prompts * args.input_len / r) for r in rounds],
                      "compiled": compiled,
                      "after_build": {k: v for k, v in log.events.items() if k != "build"},
                      "built_variants_of_those": [e for e in log.events["build"] if e.split("[")[0] in late]}))


if __name__ == "__main__":
    main()
