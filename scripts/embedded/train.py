"""The training phase: AdamW, linear warmup then cosine decay (optionally on wall-clock progress), the loop
with router bias updates and periodic validation, and the final train / validation losses."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moeserve.model.deepseek import DeepseekModel

from .batches import Batcher, causal_meta, fixed_eval_starts
from .common import log
from .model_init import update_router_bias


@dataclass
class Runtime:
    """The model with what running it needs: the autocast context and cached attention metadata."""
    model: DeepseekModel
    device: torch.device
    seq_len: int
    use_amp: bool
    metas: dict[int, object] = field(default_factory=dict)

    def amp(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp)

    def meta_for(self, batch: int):
        if batch not in self.metas:
            self.metas[batch] = causal_meta(batch, self.seq_len, self.device)
        return self.metas[batch]


@dataclass
class Windows:
    """Training / validation batchers and the fixed evaluation windows."""
    train: Batcher
    val: Batcher
    val_starts: torch.Tensor
    train_starts: torch.Tensor
    eval_batch: int


@dataclass
class LoopState:
    step: int = 0
    time_stop: bool = False
    interval_loss: float = 0.0
    interval_n: int = 0
    t_interval: float = field(default_factory=time.time)
    balance: list[float] = field(default_factory=list)  # per MoE layer: mean over the last log interval
    balance_sum: list[float] = field(default_factory=list)  # of the step's max/mean load


@dataclass
class TrainResult:
    steps: int
    time_stop: bool
    balance: list[float]
    train_seconds: float
    warmup: int
    use_amp: bool
    train_loss: float
    val_loss: float
    windows: Windows


def make_optimizer(model: DeepseekModel, args: argparse.Namespace, device: torch.device):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def make_windows(data: dict, args: argparse.Namespace, device: torch.device) -> Windows:
    train_stream, val_stream = data["train"], data["val"]
    return Windows(
        train=Batcher(train_stream, args.seq_len, device, args.seed),
        val=Batcher(val_stream, args.seq_len, device, args.seed + 1),
        val_starts=fixed_eval_starts(len(val_stream), args.seq_len, args.eval_windows, args.seed + 2),
        train_starts=fixed_eval_starts(len(train_stream), args.seq_len, args.eval_windows, args.seed + 3),
        eval_batch=min(args.batch_size, 16))


def learning_rate(step: int, progress: float, args: argparse.Namespace, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from the peak to min_lr_ratio x peak."""
    if step < warmup:
        return args.lr * (step + 1) / warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)


def schedule_progress(step: int, steps: int, t_loop: float, loop_budget: float | None) -> float | None:
    """max(step / steps, elapsed / budget); None once the time budget is used up."""
    elapsed = time.time() - t_loop
    progress = step / steps
    if loop_budget:
        if elapsed >= loop_budget:
            return None
        progress = max(progress, elapsed / loop_budget)
    return progress


@torch.no_grad()
def evaluate(rt: Runtime, batcher: Batcher, starts: torch.Tensor, batch: int) -> float:
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        s = starts[i:i + batch]
        x, y = batcher.windows(s)
        with rt.amp():
            logits = rt.model(x, rt.meta_for(len(s)), None, all_logits=True)
        total += F.cross_entropy(logits.float(), y, reduction="sum").item()
        count += y.numel()
    for moe in rt.model.moe_layers().values():
        moe.tokens_per_expert.zero_()  # evaluation does not count towards load balancing
    return total / max(count, 1)


def train_step(rt: Runtime, opt, batches: Batcher, args: argparse.Namespace, lr: float,
               state: LoopState) -> None:
    """One optimizer step at ``lr`` plus the router bias update; accumulates loss and balance in ``state``."""
    for group in opt.param_groups:
        group["lr"] = lr
    x, y = batches.sample(args.batch_size)
    with rt.amp():
        logits = rt.model(x, rt.meta_for(args.batch_size), None, all_logits=True)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(rt.model.parameters(), args.grad_clip)
    opt.step()
    ratios = update_router_bias(rt.model, args.bias_update_rate)
    state.balance_sum = [a + b for a, b in zip(state.balance_sum, ratios)] if state.balance_sum else ratios
    state.step += 1
    state.interval_loss += loss.item()
    state.interval_n += 1


def log_interval(state: LoopState, args: argparse.Namespace, lr: float, t_start: float) -> None:
    dt = time.time() - state.t_interval
    n = state.interval_n
    state.balance = [r / n for r in state.balance_sum]
    log(f"step {state.step:5d} | loss {state.interval_loss / n:.4f} | lr {lr:.2e} | "
        f"{n / dt:.2f} steps/s, {n * args.batch_size * args.seq_len / dt:,.0f} tok/s | "
        f"max/mean expert load per MoE layer {' '.join(f'{r:.2f}' for r in state.balance)} | "
        f"{time.time() - t_start:.0f}s")
    state.interval_loss, state.interval_n, state.t_interval, state.balance_sum = 0.0, 0, time.time(), []


def validate(rt: Runtime, win: Windows, state: LoopState) -> None:
    t_eval = time.time()
    rt.model.eval()
    v = evaluate(rt, win.val, win.val_starts, win.eval_batch)
    rt.model.train()
    log(f"step {state.step:5d} | val loss {v:.4f}")
    state.t_interval += time.time() - t_eval  # keep evaluation out of the logged training speed


def train_loop(rt: Runtime, opt, win: Windows, args: argparse.Namespace, warmup: int, t_start: float,
               t_loop: float, loop_budget: float | None) -> LoopState:
    state = LoopState()
    rt.model.train()
    while state.step < args.steps:
        progress = schedule_progress(state.step, args.steps, t_loop, loop_budget)
        if progress is None:
            state.time_stop = True
            break
        lr = learning_rate(state.step, progress, args, warmup)
        train_step(rt, opt, win.train, args, lr, state)
        if state.step % args.log_every == 0 or state.step == args.steps:
            log_interval(state, args, lr, t_start)
        if args.eval_every and state.step % args.eval_every == 0 and state.step < args.steps:
            validate(rt, win, state)
    if state.interval_n:
        state.balance = [r / state.interval_n for r in state.balance_sum]
    return state


def train(model: DeepseekModel, data: dict, args: argparse.Namespace, device: torch.device,
          t_start: float, deadline: float | None) -> TrainResult:
    """Train ``model`` in place (stopping at ``deadline`` if given), then evaluate it."""
    use_amp = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rt = Runtime(model, device, args.seq_len, use_amp)
    opt = make_optimizer(model, args, device)
    warmup = max(1, min(args.warmup, args.steps // 10))
    win = make_windows(data, args, device)

    t_loop = time.time()
    loop_budget = (deadline - t_loop) if deadline else None
    if loop_budget is not None and loop_budget <= 0:
        raise SystemExit("--max-minutes already used up by data preparation")
    log(f"train: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr}, warmup {warmup}, "
        f"{'bf16 autocast' if use_amp else 'fp32'}"
        + (f", training stops at {loop_budget / 60:.1f} min from now" if loop_budget else ""))
    state = train_loop(rt, opt, win, args, warmup, t_start, t_loop, loop_budget)
    train_seconds = time.time() - t_loop
    log(f"train: {'stopped by --max-minutes' if state.time_stop else 'done'} after {state.step} steps in "
        f"{train_seconds:.1f}s ({state.step / max(train_seconds, 1e-9):.2f} steps/s)")

    model.eval()
    val_loss = evaluate(rt, win.val, win.val_starts, win.eval_batch)
    train_loss = evaluate(rt, win.train, win.train_starts, win.eval_batch)
    log(f"final: train loss {train_loss:.4f} | val loss {val_loss:.4f} (ppl {math.exp(val_loss):.1f})")
    return TrainResult(state.step, state.time_stop, state.balance, train_seconds, warmup, use_amp,
                       train_loss, val_loss, win)
