"""Time to first token of a cold batch (no prefix in the cache), repeated in one engine: is the first batch
after start any slower than the next ones?

Builds the engine on dummy weights, then ``--repeats`` times queues ``--prompts`` prompts of ``--input-len``
fresh random tokens at once and steps until every one has its first token; prints each round's time.

    python benchmarks/ttft_cold.py --model benchmarks/configs/deepseek_v3_6l --prompts 32 --input-len 1024
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/configs/deepseek_v2_lite")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    start = time.perf_counter()
    engine = Engine(EngineConfig(model=args.model, device="cuda", load_format="dummy", skip_tokenizer_init=True))
    build_s = time.perf_counter() - start
    rounds = [cold_round(engine, args.prompts, args.input_len, r) for r in range(args.repeats)]
    print(json.dumps({"model": args.model, "prompts": args.prompts, "input_len": args.input_len,
                      "build_s": round(build_s, 1), "last_first_token_s": [round(r, 3) for r in rounds],
                      "prompt_tok_s": [round(args.prompts * args.input_len / r) for r in rounds]}))


if __name__ == "__main__":
    main()
