"""TRAINING.md: the record of how the checkpoint was made (command, model, data, training, balance, sample)."""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from moeserve.model.deepseek import DeepseekModel

from .common import EXCLUDED_DIRS, SAMPLE_PROMPT, SIZE_LIMIT_BYTES, device_name, log
from .train import TrainResult


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def bias_rows(model: DeepseekModel, balance: list[float]) -> list[tuple[int, float, str]]:
    """(layer, max/mean load, correction bias) per MoE layer."""
    rows = []
    for (i, moe), ratio in zip(model.moe_layers().items(), balance or [0.0] * len(model.moe_layers())):
        b = moe.e_score_correction_bias
        rows.append((i, ratio, "[" + ", ".join(f"{v:+.3f}" for v in b.tolist()) + "]" if b is not None else "-"))
    return rows


def training_info(*, command: str, shape: dict, params: tuple[int, int], data: dict, model: DeepseekModel,
                  device: torch.device, args: argparse.Namespace, result: TrainResult, diff: float,
                  sample: str) -> dict:
    """Everything TRAINING.md reports (total_seconds and dir_bytes are filled in by ``finish``)."""
    step, train_len = result.steps, len(data["train"])
    return dict(
        command=command, shape=shape, params=params[0], active=params[1], dir_bytes=0,
        data=dict(root=data["root"], n_train=len(data["train_files"]), n_val=len(data["val_files"]),
                  train_tokens=train_len, val_tokens=len(data["val"]), val_files=data["val_files"]),
        device=device_name(device), steps_done=step, steps_planned=args.steps,
        time_stop=result.time_stop, batch=args.batch_size, seq_len=args.seq_len,
        tokens_seen=step * args.batch_size * args.seq_len,
        epochs=step * args.batch_size * args.seq_len / train_len, weight_decay=args.weight_decay,
        lr=args.lr, warmup=result.warmup, dropout=args.dropout, min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip,
        precision="bf16 autocast, fp32 master weights and router" if result.use_amp else "fp32",
        bias_rate=args.bias_update_rate, seed=args.seed, train_seconds=result.train_seconds,
        steps_per_s=step / max(result.train_seconds, 1e-9), total_seconds=0.0,
        eval_windows=len(result.windows.val_starts), train_loss=result.train_loss, val_loss=result.val_loss,
        verify_diff=diff, balance=bias_rows(model, result.balance), sample=sample,
        sample_tokens=args.sample_tokens)


def _header(info: dict) -> str:
    """Title, command, model."""
    return f"""# Training record of this checkpoint

Written by `scripts/train_embedded.py` (see `docs/embedded_model.md`).

## Command

```
{info['command']}
```

## Model

DeepSeek-V3 architecture (`model_type: deepseek_v3`): MLA attention, {info['shape']['num_hidden_layers']} layers
(first {info['shape']['first_k_dense_replace']} dense), {info['shape']['n_routed_experts']} routed experts
(top-{info['shape']['num_experts_per_tok']}, sigmoid scores, `noaux_tc` with n_group {info['shape']['n_group']} /
topk_group {info['shape']['topk_group']}) + {info['shape']['n_shared_experts']} shared expert per MoE layer.
Parameters: {info['params']:,} total, {info['active']:,} active per token. Weights in bfloat16 (router weight
and correction bias in float32). Directory size: {info['dir_bytes']:,} bytes.

Shape: `{json.dumps(info['shape'])}`

"""


def _data_section(info: dict) -> str:
    """The corpus and tokenizer."""
    return f"""## Data

Python {platform.python_version()} standard library sources under `{info['data']['root']}`
(`.py` files, sorted, skipping directories {', '.join(EXCLUDED_DIRS)}): {info['data']['n_train']} training
files ({info['data']['train_tokens']:,} tokens), {info['data']['n_val']} held-out validation files
({info['data']['val_tokens']:,} tokens). Each file is `<|bos|> text <|eos|>`. Tokenizer: byte-level BPE trained
with `tokenizers` on the training files, vocab {info['shape']['vocab_size']}.

Validation files: {', '.join(f'`{f}`' for f in info['data']['val_files'])}

"""


def _training_section(info: dict) -> str:
    """The training settings and results table."""
    return f"""## Training

| | |
| --- | --- |
| device | {info['device']} |
| steps | {info['steps_done']} of {info['steps_planned']} planned{' (stopped by --max-minutes)' if info['time_stop'] else ''} |
| batch | {info['batch']} sequences x {info['seq_len']} tokens = {info['batch'] * info['seq_len']:,} tokens/step |
| tokens seen | {info['tokens_seen']:,} (~{info['epochs']:.2f} epochs of the training stream) |
| optimiser | AdamW (betas 0.9/0.95, weight decay {info['weight_decay']} on matrices), peak lr {info['lr']}, {info['warmup']} warmup steps, cosine to {info['min_lr_ratio']} x peak, grad clip {info['grad_clip']} |
| dropout (training only) | {info['dropout']} |
| precision | {info['precision']} |
| load balancing | aux-loss-free bias update, rate {info['bias_rate']} per step |
| seed | {info['seed']} |
| training loop wall time | {info['train_seconds']:.1f} s ({info['steps_per_s']:.2f} steps/s) |
| total wall time (data, training, evaluation, save, verification) | {info['total_seconds']:.1f} s |
| final train loss ({info['eval_windows']} fixed windows) | {info['train_loss']:.4f} |
| final validation loss ({info['eval_windows']} fixed windows) | {info['val_loss']:.4f} (perplexity {math.exp(info['val_loss']):.1f}) |
| load-back check | max abs logit difference {info['verify_diff']:.3g} |

"""


def _balance_and_sample(info: dict, load: str) -> str:
    """Per-layer expert load and correction bias, and the greedy sample."""
    return f"""Per MoE layer at the end: max/mean expert load (per step, averaged over the last logging interval; 1.00 is
perfect balance, n_routed/top_k = all tokens on one expert) and the correction bias:

| layer | max/mean load | e_score_correction_bias |
| --- | --- | --- |
{load}

## Sample

Greedy continuation of `{SAMPLE_PROMPT}` (loaded checkpoint, {info['sample_tokens']} new tokens at most):

```
{SAMPLE_PROMPT}{info['sample']}
```
"""


def write_training_md(out: Path, info: dict) -> None:
    load = "\n".join(f"| {layer} | {ratio:.2f} | {bias} |" for layer, ratio, bias in info["balance"])
    text = _header(info) + _data_section(info) + _training_section(info) + _balance_and_sample(info, load)
    (out / "TRAINING.md").write_text(text)


def finish(out: Path, info: dict, t_start: float) -> int:
    """Write TRAINING.md (twice: the second time with the directory's final size) and check the size limit
    -> the exit status."""
    info["total_seconds"] = time.time() - t_start
    write_training_md(out, info)
    info["dir_bytes"] = dir_bytes(out)
    write_training_md(out, info)  # again, with the final size (TRAINING.md's own size barely changes)
    size = dir_bytes(out)
    log(f"done: {out} is {size:,} bytes ({size / 1e6:.2f} MB); total wall time {info['total_seconds']:.1f}s")
    if size > SIZE_LIMIT_BYTES:
        log(f"WARNING: {out} is larger than {SIZE_LIMIT_BYTES / 1e6:.0f} MB")
        return 1
    return 0
