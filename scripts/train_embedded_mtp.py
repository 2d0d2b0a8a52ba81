#!/usr/bin/env python3
"""Train the embedded default model's multi-token-prediction (MTP) module, the main model frozen.

Reads the checkpoint (default: moeserve/assets/default_model), tokenizes the Python standard library's
``.py`` files with the checkpoint's own tokenizer (the held-out files as ``scripts/train_embedded.py``
picks them), trains the MTP module on the CPU for ``--max-minutes`` (see ``scripts/embedded/mtp.py`` for the
recipe), then writes its tensors into the checkpoint under DeepSeek-V3's names (layer
``num_hidden_layers``), sets ``num_nextn_predict_layers: 1`` in config.json, loads the result back with
moeserve's loader to check the module's logits, and appends the run to TRAINING.md.

    python scripts/train_embedded_mtp.py --max-minutes 4
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

_SCRIPTS = str(Path(__file__).resolve().parent)
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)

from embedded.batches import causal_meta  # noqa: E402
from embedded.common import device_name, log  # noqa: E402
from embedded.data import encode_stream, read_text, stdlib_files, validation_indices  # noqa: E402
from embedded.mtp import load_frozen, mtp_tensors, train_mtp  # noqa: E402

from moeserve.coordinator.config import default_model_path  # noqa: E402
from moeserve.model.loader import load_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model_path(), help="checkpoint to add the module to")
    p.add_argument("--max-minutes", type=float, default=4.0, help="training time (the schedule follows it)")
    p.add_argument("--steps", type=int, default=100000, help="at most this many steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--fit-tokens", type=int, default=16384, help="positions of the closed-form eh_proj fit")
    p.add_argument("--generated", type=int, default=128, help="greedy continuations to train on (half of each batch)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of each continuation")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default; on a CPU shared with other jobs one thread avoids "
                        "OpenMP stalls)")
    return p.parse_args(argv)


def token_streams(ckpt: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    root, files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    texts = [read_text(f) for f in files]
    val_idx = validation_indices(rel, texts)
    train = encode_stream(tok, [t for i, t in enumerate(texts) if i not in val_idx])
    val = encode_stream(tok, [t for i, t in enumerate(texts) if i in val_idx])
    log(f"data: {root}: {len(train):,} train tokens, {len(val):,} val tokens")
    return train, val, str(root)


def write_module(ckpt: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Add the tensors to model.safetensors (the main model's are kept as they are) and set
    num_nextn_predict_layers; returns the bytes the file grew by."""
    from safetensors.torch import load_file, save_file

    file = ckpt / "model.safetensors"
    before = file.stat().st_size
    prefix = ".".join(next(iter(tensors)).split(".")[:3]) + "."  # model.layers.N.
    existing = {k: v for k, v in load_file(str(file)).items() if not k.startswith(prefix)}
    save_file({**existing, **tensors}, str(file), metadata={"format": "pt"})
    config = json.loads((ckpt / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (ckpt / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return file.stat().st_size - before


def check_loaded(ckpt: Path, trained) -> float:
    """Max |logit difference| between the trained module and the one loaded back (bf16 rounding)."""
    loaded = load_model(ckpt, dtype=torch.float32, with_mtp=True)
    ids = torch.tensor([0, 100, 200, 300, 400, 500, 600, 700])
    meta = causal_meta(1, len(ids), torch.device("cpu"))
    meta_mtp = causal_meta(1, len(ids) - 1, torch.device("cpu"))
    outs = []
    with torch.no_grad():
        for model in (trained, loaded):
            h = model.norm(model.forward_layers(model.embed(ids), meta, None))
            outs.append(model.mtp_logits(model.mtp_forward(ids[1:], h[:-1], meta_mtp, None)))
    return float((outs[0] - outs[1]).abs().max())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    train, val, root = token_streams(args.model)
    model = load_frozen(args.model)
    result = train_mtp(model, train, val, args)
    tensors = mtp_tensors(model)
    grew = write_module(args.model, tensors)
    diff = check_loaded(args.model, model)
    log(f"written: {len(tensors)} tensors, model.safetensors grew by {grew:,} bytes; load-back max |diff| {diff:.4f}")
    n_params = sum(p.numel() for p in model.mtp.parameters())  # type: ignore[union-attr]
    record = f"""
## MTP module (speculative decoding)

Trained by `scripts/train_embedded_mtp.py` (recipe in `scripts/embedded/mtp.py`), the main model frozen.

| | |
| --- | --- |
| command | `{command}` |
| device | {device_name(torch.device("cpu"))} |
| data | `.py` files under `{root}`, tokenized with this checkpoint's tokenizer ({len(train):,} train / {len(val):,} val tokens) |
| module | layer {model.config.mtp_layer_id}: enorm, hnorm, eh_proj, one MoE decoder block, shared_head.norm ({n_params:,} parameters; embedding and head shared with the main model) |
| init | block copied from layer {model.config.num_hidden_layers - 1}, shared_head.norm from the final norm, eh_proj fitted by ridge regression on {args.fit_tokens} positions (R^2 {result['r2']:.3f}) |
| loss | mean of cross-entropy with the data's token t+2 and with the main model's distribution at t+1 |
| batch | {args.batch_size} x {args.seq_len} tokens, AdamW lr {args.lr} cosine to 0.1x, grad clip 1.0 |
| steps | {result['steps']} in {result['seconds']:.0f} s |
| data mix | half stdlib windows, half the main model's greedy continuations of {result['generated']} stdlib prompts of {args.prompt_len} tokens |
| val loss / argmax agreement with the main model (held-out stdlib text) | before {result['before'][0]:.3f} / {result['before'][1]:.3f}, after {result['after'][0]:.3f} / {result['after'][1]:.3f} |
| argmax agreement on the main model's continuations of held-out prompts | before {result['before_gen'][1]:.3f}, after {result['after_gen'][1]:.3f} |
| checkpoint growth | {grew:,} bytes (bfloat16) |
| load-back check | max abs logit difference {diff:.4f} (bfloat16 rounding) |
| total wall time | {time.time() - t0:.0f} s |
"""
    with open(args.model / "TRAINING.md", "a") as f:
        f.write(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
