#!/usr/bin/env python3
"""Train moeserve's small embedded default model: a DeepSeek-V3-architecture checkpoint on Python's stdlib.

The model is the real DeepSeek-V3 architecture at toy size -- MLA attention (low-rank q and compressed kv
latent with a decoupled rotary key), one dense layer then MoE layers with one shared and several routed
experts behind a sigmoid / ``noaux_tc`` router with a score-correction bias -- trained from scratch with
moeserve's *own* model code (``moeserve.model.deepseek.DeepseekModel`` in its no-cache mode; no
``transformers``) on text every machine has offline: the ``.py`` sources of the Python standard library.

It writes a Hugging Face-layout checkpoint directory (config.json, model.safetensors in bfloat16 with
DeepSeek's tensor names, tokenizer.json, tokenizer_config.json, generation_config.json, TRAINING.md), then
loads it back with ``moeserve.model.loader.load_model`` and checks the logits against the in-memory model.

    python scripts/train_embedded.py --out moeserve/assets/default_model --device cuda --max-minutes 6

Steps:
  1. corpus: ``sysconfig.get_paths()["stdlib"]``/**.py, sorted, skipping test/tests/idlelib/site-packages;
     every 30th ordinary-looking file (not encodings/ or pydoc_data/, 2-100 kB) is held out for validation;
  2. tokenizer: byte-level BPE (``tokenizers``), vocab 4096, ``<|bos|>`` = 0 and ``<|eos|>`` = 1, trained on
     the training files; each file becomes ``<|bos|> text <|eos|>`` in one token stream. The tokenizer and
     the token streams are cached under ``--cache-dir`` keyed by a hash of the file contents and settings;
  3. training: random windows of ``--seq-len + 1`` tokens (a quarter of them start at a file's first token,
     so generation from ``<|bos|>`` is in distribution), AdamW, linear warmup then cosine decay, gradient
     clipping, bf16 autocast on CUDA, and DeepSeek-V3's auxiliary-loss-free load balancing: after each step
     every MoE layer's ``e_score_correction_bias`` moves by ``--bias-update-rate * sign(mean_load - load)``
     (no gradient flows into the bias; the default rate 1e-2 is 10x DeepSeek-V3's 1e-3, matching our ~10x
     higher learning rate -- at 1e-3 the router collapsed onto one or two experts within 100 steps). With ``--max-minutes`` the cosine schedule runs on
     ``max(step / steps, elapsed / budget)``, so a time-limited run still ends at the low learning rate;
  4. save, load back, compare, and print a greedy continuation of ``def fib(n):``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

_SCRIPTS = str(Path(__file__).resolve().parent)
if _SCRIPTS not in sys.path:  # the phases live in scripts/embedded/, outside the installed package
    sys.path.insert(0, _SCRIPTS)

from embedded.common import SAMPLE_PROMPT, SHAPE, device_name, log  # noqa: E402
from embedded.data import prepare_data  # noqa: E402
from embedded.export import greedy, save_checkpoint, verify_checkpoint  # noqa: E402
from embedded.model_init import build_model  # noqa: E402
from embedded.report import finish, training_info  # noqa: E402
from embedded.train import train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=4000, help="planned optimizer steps (the schedule's length)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100, help="warmup steps (capped at steps / 10)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.1,
                   help="training-only dropout on the embedding and residual branches (0 = off)")
    p.add_argument("--bias-update-rate", type=float, default=1e-2,
                   help="aux-loss-free balancing: correction-bias step per optimizer step (0 = off)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training this many minutes after the script started (then evaluate and save)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=SHAPE["vocab_size"])
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500, help="validation loss every N steps (0 = only at the end)")
    p.add_argument("--eval-windows", type=int, default=64, help="fixed windows for train/val loss")
    p.add_argument("--cache-dir", default="/tmp/moeserve_embedded_cache", help="tokenizer/token cache")
    p.add_argument("--sample-tokens", type=int, default=64)
    return p.parse_args(argv)


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, dict]:
    """--device auto -> cuda or cpu; -> (device, the checkpoint's shape). Exits on an impossible request."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    shape = dict(SHAPE, vocab_size=args.vocab_size)
    if args.seq_len > shape["max_position_embeddings"]:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds max_position_embeddings {shape['max_position_embeddings']}")
    return torch.device(args.device), shape


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    deadline = t_start + args.max_minutes * 60 if args.max_minutes else None
    device, shape = resolve_device(args)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    log(f"device: {device_name(device)}")

    data = prepare_data(args)  # steps 1-2: corpus, tokenizer, token streams
    model, n_params, n_active = build_model(shape, args.seed, args.dropout, device)
    result = train(model, data, args, device, t_start, deadline)  # step 3, then the final evaluation
    tensors = save_checkpoint(args.out, model, shape, data["tokenizer"])  # step 4: save, load back, compare
    loaded, diff = verify_checkpoint(args.out, model, tensors, result.windows.val, result.windows.val_starts,
                                     args.seq_len)
    sample = greedy(loaded, data["tokenizer"], SAMPLE_PROMPT, args.sample_tokens, torch.device("cpu"), args.seq_len)
    log(f"sample (greedy, loaded checkpoint):\n{SAMPLE_PROMPT}{sample}\n")

    info = training_info(command=command, shape=shape, params=(n_params, n_active), data=data, model=model,
                         device=device, args=args, result=result, diff=diff, sample=sample)
    return finish(args.out, info, t_start)


if __name__ == "__main__":
    sys.exit(main())
