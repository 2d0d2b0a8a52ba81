"""``moeserve generate``: run prompts as one continuous batch and stream the text to the terminal."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moeserve.errors import UserError
from moeserve.launch.engine_args import engine_config

NEEDS_ENGINE_ARGS = True


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text for one or more prompts")
    add_generation_args(p)
    return p


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help="prompts (each argument is one prompt)")
    p.add_argument("--prompts-file", type=Path, help="a file with one prompt per line (default: none)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt, at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling: keep the smallest set of tokens whose probability adds up to this")
    p.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens; -1 = all")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this fraction of the most likely one; 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already seen by this (> 1 repeats less); 1 = off")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; default: none)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object per prompt: {"prompt", "text", "token_ids"}')


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            text = args.prompts_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompts-file {args.prompts_file}: {e}") from e
        prompts += [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one prompt (arguments or --prompts-file)")
    return prompts


class OrderedStreamer:
    """Streams prompt i's text live while it is the first unfinished prompt; buffers the others."""

    def __init__(self, prompts: list[str], out=sys.stdout):
        self.prompts, self.out = prompts, out
        self.buffers = [""] * len(prompts)
        self.done = [False] * len(prompts)
        self.current = -1
        self._advance()

    def _advance(self) -> None:
        while self.current + 1 < len(self.prompts):
            self.current += 1
            i = self.current
            prompt = f"\033[1m{self.prompts[i]}\033[0m" if self.out.isatty() else self.prompts[i]
            self.out.write(("\n" if i else "") + prompt + self.buffers[i])
            if not self.done[i]:
                break
        self.out.flush()

    def feed(self, index: int, text: str, finished: bool) -> None:
        self.buffers[index] += text
        if index == self.current:
            self.out.write(text)
            self.out.flush()
        self.done[index] = finished
        if finished and index == self.current:
            self._advance()

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()


def sampling_params(args: argparse.Namespace):
    from moeserve.coordinator.sampling import SamplingParams, SamplingParamsError

    try:
        return SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    except SamplingParamsError as e:
        raise UserError(str(e)) from e


def run(args: argparse.Namespace) -> int:
    from moeserve.coordinator.engine import Engine
    from moeserve.launch.preflight import check_engine

    prompts = read_prompts(args)
    params = sampling_params(args)
    config = engine_config(args, progress=not args.json)
    check_engine(config)
    engine = Engine(config)
    try:
        return generate(engine, prompts, params, args.json)
    finally:
        engine.close()


def generate(engine, prompts: list[str], params, as_json: bool) -> int:
    from moeserve.coordinator.request import RequestError

    index = {}
    for i, prompt in enumerate(prompts):
        try:
            engine.add_request(f"cli-{i}", prompt=prompt, params=params)
        except RequestError as e:
            raise UserError(f"prompt {i + 1}: {e}") from e
        index[f"cli-{i}"] = i
    streamer = None if as_json else OrderedStreamer(prompts)
    results: dict[int, tuple[str, list[int]]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            i = index[out.request_id]
            if streamer:
                streamer.feed(i, out.text_delta, out.finished)
            if out.finished:
                results[i] = (out.output_text or "", out.output_token_ids or [])
    if streamer:
        streamer.close()
    else:
        for i, prompt in enumerate(prompts):
            text, ids = results[i]
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": ids}, ensure_ascii=False))
    return 0
