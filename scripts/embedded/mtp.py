"""The embedded model's MTP module: trained with the main model frozen, then written into the checkpoint.

DeepSeek-V3's recipe at depth 1: from the main model's hidden state at t (after its final norm) and the
embedding of token t+1, predict token t+2. The loss is the mean of two cross-entropies at each position: with
the data's token t+2 (the recipe), and with the main model's own distribution at t+1 (its prediction of
t+2; self-distillation, which is what a drafter is scored on: agreeing with the main model). Half of each
batch is the standard library's text, half the main model's own greedy continuations of prompts taken from
it (generated once, by moeserve's engine): the text a drafter sees when serving greedy requests. Only the
MTP module's own tensors train; the embedding and the output head are the main model's, shared and frozen.

The module starts from the main model, which makes a few minutes of training on a shared CPU enough: its
decoder block is a copy of the last layer and ``shared_head.norm`` the final norm, so the module is the
main model's last layer run once more; ``eh_proj`` is then fitted in closed form (ridge regression over
``--fit-tokens`` positions) to map [enorm(emb(t+1)) ; hnorm(h_t)] to what the last layer reads at t+1 (the
residual stream after the layers before it). Gradient steps on the loss below follow, for what time is
left.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moeserve.model.deepseek import DeepseekModel
from moeserve.model.loader import Checkpoint, _Reader, fill_weights
from moeserve.model.weights import weight_specs

from .batches import Batcher, causal_meta
from .common import log
from .export import _attn_tensors, _bf16, _moe_tensors


def load_frozen(path: Path) -> DeepseekModel:
    """The checkpoint's main model (frozen) with a fresh MTP module, in float32 on the CPU."""
    from contextlib import ExitStack

    ckpt = Checkpoint(path)
    config = ckpt.config().replace(num_nextn_predict_layers=1)
    model = DeepseekModel(config, dtype=torch.float32, with_mtp=True)
    prefix = f"model.layers.{config.mtp_layer_id}."
    specs = [s for s in weight_specs(model) if not s.name.startswith(prefix)]
    with ExitStack() as stack:
        fill_weights(specs, _Reader(ckpt, stack, None))
    model.requires_grad_(False)
    init_from_main(model)
    assert model.mtp is not None
    model.mtp.requires_grad_(True)
    return model


def init_from_main(model: DeepseekModel) -> None:
    mtp, config = model.mtp, model.config
    assert mtp is not None
    last = model.decoder_layers()[config.num_hidden_layers - 1]
    with torch.no_grad():
        mtp.block.load_state_dict(last.state_dict())
        hidden = config.hidden_size
        mtp.eh_proj.zero_()
        mtp.eh_proj[:, hidden:] = torch.eye(hidden)
        mtp.eh_proj[:, :hidden] = torch.randn(hidden, hidden) * (0.1 / hidden ** 0.5)
        mtp.shared_head_norm.weight.copy_(model.norm.weight)


@torch.no_grad()
def fit_eh_proj(model: DeepseekModel, batcher: Batcher, num_tokens: int, seq_len: int, ridge: float = 1e-2) -> float:
    """Least squares: eh_proj := argmin_W |W x_t - r_{t+1}|^2 + ridge |W|^2 over windows of the training
    stream, x_t = [rms(emb(t+1)) ; rms(h_t)] (the norms' weights are one at this point), r_{t+1} the residual
    stream entering the last layer at t+1. Returns the fit's R^2."""
    mtp = model.mtp
    assert mtp is not None
    batch = max(1, num_tokens // seq_len)
    inputs, _ = batcher.sample(batch)
    meta = causal_meta(batch, seq_len, torch.device("cpu"))
    layers = list(model.decoder_layers().values())
    h, residual = model.embed(inputs), None
    for layer in layers[:-1]:
        h, residual = layer(h, residual, meta, None)
    stream = (h if residual is None else residual + h).view(batch, seq_len, -1)
    h, residual = layers[-1](h, residual, meta, None)
    final = model.norm(residual + h).view(batch, seq_len, -1)
    emb = model.embed(inputs).view(batch, seq_len, -1)[:, 1:]
    emb[:, 0] = 0.0  # the module zeroes the embedding at position 0
    x = torch.cat([mtp.enorm(emb), mtp.hnorm(final[:, :-1])], -1).reshape(-1, 2 * final.shape[-1]).double()
    y = stream[:, 1:].reshape(-1, final.shape[-1]).double()
    gram = x.T @ x + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, x.T @ y).T  # [hidden, 2 * hidden]
    mtp.eh_proj.copy_(w.float())
    resid = y - x @ w.T
    return float(1 - resid.pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def mtp_loss(model: DeepseekModel, inputs: torch.Tensor, targets: torch.Tensor, batch: int, seq_len: int,
             metas: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, agreement with the main model's argmax) on B windows of L tokens: rows t < L-1 of each."""
    if batch not in metas:
        metas[batch] = (causal_meta(batch, seq_len, torch.device("cpu")),
                        causal_meta(batch, seq_len - 1, torch.device("cpu")))
    meta, meta_mtp = metas[batch]
    with torch.no_grad():
        h = model.norm(model.forward_layers(model.embed(inputs), meta, None)).view(batch, seq_len, -1)
        teacher = model.logits(h[:, 1:].reshape(-1, h.shape[-1]))  # main model at t+1: its view of t+2
    nxt = inputs.view(batch, seq_len)[:, 1:].reshape(-1)  # token t+1
    out = model.mtp_forward(nxt, h[:, :-1].reshape(-1, h.shape[-1]), meta_mtp, None)
    logits = model.mtp_logits(out)
    logits, teacher = logits.float(), teacher.float()
    data = F.cross_entropy(logits, targets.view(batch, seq_len)[:, 1:].reshape(-1))
    distill = -(F.softmax(teacher, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
    agree = (logits.argmax(-1) == teacher.argmax(-1)).float().mean()
    return 0.5 * (data + distill), agree


def generated_windows(path: Path, stream: np.ndarray, num: int, prompt_len: int, seq_len: int,
                      seed: int) -> torch.Tensor:
    """[num, seq_len + 1] token windows: ``prompt_len`` tokens of ``stream`` (from a file's start or anywhere)
    and the main model's greedy continuation, generated by moeserve's engine in one batch."""
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine
    from moeserve.coordinator.sampling import SamplingParams

    batcher = Batcher(stream, prompt_len - 1, torch.device("cpu"), seed)
    inputs, targets = batcher.sample(num)
    prompts = torch.cat([inputs.view(num, -1), targets.view(num, -1)[:, -1:]], 1).tolist()
    engine = Engine(EngineConfig(model=str(path), kv_cache_memory=256 << 20, max_num_seqs=num,
                                 skip_tokenizer_init=True))
    params = SamplingParams(max_tokens=seq_len + 1 - prompt_len, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    engine.close()
    return torch.tensor([p + list(o.output_token_ids or []) for p, o in zip(prompts, outs)])


class MixedBatcher:
    """Half natural windows, half generated ones (``generated``: [N, L + 1])."""

    def __init__(self, natural: Batcher, generated: torch.Tensor, seed: int):
        self.natural, self.generated = natural, generated
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        half = batch // 2
        x, y = self.natural.sample(batch - half)
        pick = self.generated[torch.randint(0, len(self.generated), (half,), generator=self.gen)]
        return torch.cat([x, pick[:, :-1].reshape(-1)]), torch.cat([y, pick[:, 1:].reshape(-1)])


def train_mtp(model: DeepseekModel, train: np.ndarray, val: np.ndarray, args) -> dict:
    """AdamW on the MTP module for ``args.max_minutes`` (or ``args.steps``); returns the run's figures."""
    assert model.mtp is not None
    params = [p for p in model.mtp.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    batcher = Batcher(train, args.seq_len, torch.device("cpu"), args.seed)
    val_batcher = Batcher(val, args.seq_len, torch.device("cpu"), args.seed + 1)
    t_gen = time.time()
    generated = generated_windows(args.model, train, args.generated, args.prompt_len, args.seq_len, args.seed)
    val_generated = generated_windows(args.model, val, args.batch_size * args.eval_batches, args.prompt_len,
                                      args.seq_len, args.seed + 1)
    log(f"mtp: generated {len(generated)} + {len(val_generated)} continuations in {time.time() - t_gen:.0f} s")
    mixed = MixedBatcher(batcher, generated, args.seed)
    metas: dict = {}
    evaluate = lambda b: _evaluate(model, b, args, metas)  # noqa: E731
    t_fit = time.time()
    r2 = fit_eh_proj(model, batcher, args.fit_tokens, args.seq_len)
    log(f"mtp: eh_proj fitted on {args.fit_tokens} positions in {time.time() - t_fit:.0f} s (R^2 {r2:.3f})")
    before = evaluate(val_batcher)
    before_gen = _evaluate_generated(model, val_generated, args, metas)
    log(f"mtp: before training: val loss {before[0]:.3f}, agreement with the main model {before[1]:.3f} "
        f"(on its own continuations {before_gen[1]:.3f})")
    t0, step = time.time(), 0
    deadline = t0 + args.max_minutes * 60
    while step < args.steps and time.time() < deadline:
        progress = max(step / args.steps, (time.time() - t0) / (deadline - t0))
        for group in opt.param_groups:
            group["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))
        inputs, targets = mixed.sample(args.batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # AMX / AVX-512 bf16 where the CPU has them
            loss, agree = mtp_loss(model, inputs, targets, args.batch_size, args.seq_len, metas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0:
            log(f"mtp: step {step} loss {loss.item():.3f} agreement {agree.item():.3f} "
                f"({time.time() - t0:.0f} s)")
    seconds = time.time() - t0
    after = evaluate(val_batcher)
    after_gen = _evaluate_generated(model, val_generated, args, metas)
    log(f"mtp: after {step} steps ({seconds:.0f} s): val loss {after[0]:.3f}, agreement {after[1]:.3f} "
        f"(on its own continuations {after_gen[1]:.3f})")
    return dict(steps=step, seconds=seconds, before=before, after=after, r2=r2, before_gen=before_gen,
                after_gen=after_gen, generated=len(generated))


def _evaluate_generated(model: DeepseekModel, windows: torch.Tensor, args, metas: dict) -> tuple[float, float]:
    """(loss, agreement) on generated windows of held-out prompts, ``args.batch_size`` at a time."""
    losses, agrees = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(windows) - args.batch_size + 1, args.batch_size):
            w = windows[i:i + args.batch_size]
            loss, agree = mtp_loss(model, w[:, :-1].reshape(-1), w[:, 1:].reshape(-1), args.batch_size,
                                   args.seq_len, metas)
            losses.append(loss.item())
            agrees.append(agree.item())
    return float(np.mean(losses)), float(np.mean(agrees))


def _evaluate(model: DeepseekModel, batcher: Batcher, args, metas: dict) -> tuple[float, float]:
    gen_state = batcher.gen.get_state()
    batcher.gen.manual_seed(1234)
    losses, agrees = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(args.eval_batches):
            inputs, targets = batcher.sample(args.batch_size)
            loss, agree = mtp_loss(model, inputs, targets, args.batch_size, args.seq_len, metas)
            losses.append(loss.item())
            agrees.append(agree.item())
    batcher.gen.set_state(gen_state)
    return float(np.mean(losses)), float(np.mean(agrees))


def mtp_tensors(model: DeepseekModel) -> dict[str, torch.Tensor]:
    """The module's own tensors under DeepSeek-V3's names (layer ``num_hidden_layers``), bfloat16 except the
    router's, as the main layers are saved. The embedding and head are the main model's (not copied)."""
    mtp = model.mtp
    assert mtp is not None
    p = f"model.layers.{mtp.layer_id}"
    out = {f"{p}.enorm.weight": _bf16(mtp.enorm.weight), f"{p}.hnorm.weight": _bf16(mtp.hnorm.weight),
           f"{p}.eh_proj.weight": _bf16(mtp.eh_proj),
           f"{p}.shared_head.norm.weight": _bf16(mtp.shared_head_norm.weight)}
    out.update(_attn_tensors(p, mtp.block))
    out.update(_moe_tensors(p, mtp.block.mlp))
    return out
