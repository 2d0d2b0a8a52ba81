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
import copy
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import moeserve.experts.moe as moe_module
from moeserve.experts.moe import MoE
from moeserve.model.attn_metadata import build_attn_metadata
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.layers import MLP, RMSNorm

BOS, EOS = "<|bos|>", "<|eos|>"
EXCLUDED_DIRS = ("test", "tests", "idlelib", "site-packages", "__pycache__")
# validation files: every 30th (from the 15th) of the sorted files that look like ordinary code: not under
# encodings/ (codec tables) or pydoc_data/ (one large English text), 2-100 kB. They are left out of training.
VAL_EVERY, VAL_OFFSET = 30, 15
VAL_SKIP_DIRS = ("encodings", "pydoc_data")
VAL_SIZE_RANGE = (2_000, 100_000)
CACHE_FORMAT = "moeserve-embedded-v1"
SIZE_LIMIT_BYTES = 25 * 1000 * 1000
SAMPLE_PROMPT = "def fib(n):"

# The checkpoint's shape: ~10.9M parameters, ~21.8 MB in bfloat16 (see docs/embedded_model.md).
SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=1024,  # the dense layer(s)
    moe_intermediate_size=256,  # each routed expert and the shared expert
    num_hidden_layers=5,
    first_k_dense_replace=1,  # layer 0 dense, layers 1..4 MoE
    num_attention_heads=4,
    q_lora_rank=128,
    kv_lora_rank=96,
    qk_rope_head_dim=32,
    qk_nope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=4,  # noaux_tc: groups ranked by the sum of their top-2 biased scores, best 2 groups kept
    topk_group=2,
    routed_scaling_factor=1.0,
    max_position_embeddings=512,
)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def hf_config(shape: dict) -> dict:
    """The checkpoint's config.json, with DeepSeek-V3's field names."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": shape["vocab_size"],
        "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["intermediate_size"],
        "moe_intermediate_size": shape["moe_intermediate_size"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_attention_heads"],
        "n_shared_experts": shape["n_shared_experts"],
        "n_routed_experts": shape["n_routed_experts"],
        "num_experts_per_tok": shape["num_experts_per_tok"],
        "n_group": shape["n_group"],
        "topk_group": shape["topk_group"],
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": shape["routed_scaling_factor"],
        "first_k_dense_replace": shape["first_k_dense_replace"],
        "moe_layer_freq": 1,
        "kv_lora_rank": shape["kv_lora_rank"],
        "q_lora_rank": shape["q_lora_rank"],
        "qk_rope_head_dim": shape["qk_rope_head_dim"],
        "qk_nope_head_dim": shape["qk_nope_head_dim"],
        "v_head_dim": shape["v_head_dim"],
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": shape["max_position_embeddings"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_interleave": True,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
    }


# ---------------------------------------------------------------------------------------------
# corpus and tokenizer
# ---------------------------------------------------------------------------------------------

def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise SystemExit(f"no .py files found under {root}")
    return root, files


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def build_tokenizer(train_texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1, "special tokens must be ids 0 and 1"
    return tok


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """Each text -> <|bos|> ids <|eos|>, all concatenated (uint16)."""
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray([0] + enc.ids + [1], dtype=np.uint16))
    return np.concatenate(parts)


def prepare_data(args: argparse.Namespace) -> dict:
    """Corpus -> (tokenizer, train stream, val stream, file lists), cached under --cache-dir."""
    from tokenizers import Tokenizer

    root, files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    texts = [read_text(f) for f in files]
    eligible = [i for i, (r, t) in enumerate(zip(rel, texts))
                if r.split("/")[0] not in VAL_SKIP_DIRS and VAL_SIZE_RANGE[0] <= len(t) <= VAL_SIZE_RANGE[1]]
    val_idx = {i for n, i in enumerate(eligible) if n % VAL_EVERY == VAL_OFFSET % VAL_EVERY}
    if not val_idx:
        val_idx = {eligible[0] if eligible else 0}
    h = hashlib.sha256(f"{CACHE_FORMAT}|{args.vocab_size}|{sorted(val_idx)}".encode())
    for name, text in zip(rel, texts):
        h.update(name.encode() + b"\0" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    key = h.hexdigest()[:16]
    cache = Path(args.cache_dir) / key
    train_texts = [t for i, t in enumerate(texts) if i not in val_idx]
    val_texts = [t for i, t in enumerate(texts) if i in val_idx]
    t0 = time.time()
    if (cache / "tokenizer.json").is_file() and (cache / "train.npy").is_file() and (cache / "val.npy").is_file():
        tok = Tokenizer.from_file(str(cache / "tokenizer.json"))
        train, val = np.load(cache / "train.npy"), np.load(cache / "val.npy")
        log(f"data: cache hit {cache}")
    else:
        log(f"data: training tokenizer and tokenising {len(files)} files ({sum(map(len, texts)) / 1e6:.1f}M chars)")
        tok = build_tokenizer(train_texts, args.vocab_size)
        train, val = encode_stream(tok, train_texts), encode_stream(tok, val_texts)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"tokenizer.json.{os.getpid()}"
        tok.save(str(tmp))
        np.save(cache / "train.npy", train)
        np.save(cache / "val.npy", val)
        tmp.replace(cache / "tokenizer.json")  # written last: marks the cache entry complete
    log(f"data: {root} | {len(files) - len(val_idx)} train files, {len(val_idx)} val files | "
        f"{len(train):,} train tokens, {len(val):,} val tokens | {time.time() - t0:.1f}s")
    return dict(tokenizer=tok, train=train, val=val, root=str(root), cache=str(cache),
                train_files=[r for i, r in enumerate(rel) if i not in val_idx],
                val_files=[r for i, r in enumerate(rel) if i in val_idx],
                chars=sum(map(len, texts)))


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

def init_weights(model: DeepseekModel, std: float = 0.02) -> None:
    """DeepseekModel allocates with torch.empty: N(0, std) for matrices (residual-output projections scaled
    by 1/sqrt(2 * layers), as in GPT-2), ones for RMSNorm weights, zeros for the correction bias."""
    out_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                continue
            leaf = name.rsplit(".", 1)[-1]
            p.normal_(0.0, out_std if leaf in ("o_proj", "down_proj", "w2") else std)
        for moe in model.moe_layers().values():
            if moe.e_score_correction_bias is not None:
                moe.e_score_correction_bias.zero_()
            moe.tokens_per_expert.zero_()


def _router_logits_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """moeserve's router_logits with autocast switched off, so the router stays in fp32 as at inference."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def make_autocast_safe(model: DeepseekModel) -> None:
    """Shims (in this process only) so moeserve's MoE layer trains under bf16 autocast:

    * the per-expert loop (``MoE.routed``, the path the fp32 reference tests pin down) is used on every
      device: the grouped-GEMM path that ``MoE`` picks on CUDA (``torch._grouped_mm``) is not autocast-aware
      and needs weights in the activation dtype, while training keeps fp32 master weights;
    * ``MoE.routed`` accumulates bf16 expert outputs with ``index_add_`` into ``zeros_like(x)``, which is
      fp32 under autocast (RMSNorm returns fp32) -> dtype error. A forward pre-hook hands the MoE its input
      in the autocast dtype, so the accumulator and expert outputs agree (and returns bf16 to the fp32
      residual stream, which promotes it back).
    * ``router_logits`` calls ``F.linear`` on fp32 tensors, which autocast would run in bf16; the
      module-level name is pointed at an fp32 version so routing during training matches inference.
    """
    moe_module.router_logits = _router_logits_fp32

    def pre_hook(module, args):
        x = args[0]
        if torch.is_autocast_enabled(x.device.type):
            return (x.to(torch.get_autocast_dtype(x.device.type)),) + tuple(args[1:])
        return None

    for moe in model.moe_layers().values():
        moe.register_forward_pre_hook(pre_hook)
        if hasattr(moe, "use_grouped_mm"):
            moe.use_grouped_mm = lambda x: False  # instance attribute shadows the static method


def add_dropout(model: DeepseekModel, p: float) -> None:
    """Training-only dropout through hooks (moeserve's model has none): on the embedding output and on each
    attention / MLP / MoE branch output before it joins the residual stream. Inactive in eval mode, so the
    saved weights and inference are unaffected."""
    if p <= 0:
        return

    def on_output(module, args, output):
        return F.dropout(output, p, module.training)

    def on_first_input(module, args):
        return (F.dropout(args[0], p, module.training),) + tuple(args[1:])

    for i, layer in enumerate(model.layers.values()):
        if i == 0:
            layer.register_forward_pre_hook(on_first_input)
        layer.self_attn.register_forward_hook(on_output)
        layer.mlp.register_forward_hook(on_output)


def count_params(model: DeepseekModel) -> tuple[int, int]:
    """-> (total parameters, parameters active per token)."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    inactive = 0
    for moe in model.moe_layers().values():
        per_expert = moe.w13[0].numel() + moe.w2[0].numel()
        inactive += (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    return total, total - inactive


def checkpoint_tensors(model: DeepseekModel) -> dict[str, torch.Tensor]:
    """moeserve's fused layout -> DeepSeek's Hugging Face tensor names (bf16; router weight and bias fp32)."""
    def bf16(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.bfloat16).contiguous().clone()

    def fp32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).contiguous().clone()

    def mlp(prefix: str, m: MLP) -> dict[str, torch.Tensor]:
        inter = m.intermediate_size
        return {f"{prefix}.gate_proj.weight": bf16(m.gate_up_proj[:inter]),
                f"{prefix}.up_proj.weight": bf16(m.gate_up_proj[inter:]),
                f"{prefix}.down_proj.weight": bf16(m.down_proj)}

    out = {"model.embed_tokens.weight": bf16(model.embed_tokens)}
    for key, layer in model.layers.items():
        p = f"model.layers.{key}"
        attn = layer.self_attn
        out[f"{p}.input_layernorm.weight"] = bf16(layer.input_layernorm.weight)
        out[f"{p}.post_attention_layernorm.weight"] = bf16(layer.post_attention_layernorm.weight)
        for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            if getattr(attn, name, None) is not None:
                out[f"{p}.self_attn.{name}.weight"] = bf16(getattr(attn, name))
        for name in ("q_a_layernorm", "kv_a_layernorm"):
            if getattr(attn, name, None) is not None:
                out[f"{p}.self_attn.{name}.weight"] = bf16(getattr(attn, name).weight)
        if isinstance(layer.mlp, MoE):
            moe = layer.mlp
            out[f"{p}.mlp.gate.weight"] = fp32(moe.gate_weight)
            if moe.e_score_correction_bias is not None:
                out[f"{p}.mlp.gate.e_score_correction_bias"] = fp32(moe.e_score_correction_bias)
            inter = moe.w2.shape[-1]
            for slot, e in enumerate(moe.placement.local_logical_ids):
                out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = bf16(moe.w13[slot, :inter])
                out[f"{p}.mlp.experts.{e}.up_proj.weight"] = bf16(moe.w13[slot, inter:])
                out[f"{p}.mlp.experts.{e}.down_proj.weight"] = bf16(moe.w2[slot])
            if moe.shared_experts is not None:
                out.update(mlp(f"{p}.mlp.shared_experts", moe.shared_experts))
        else:
            out.update(mlp(f"{p}.mlp", layer.mlp))
    out["model.norm.weight"] = bf16(model.norm.weight)
    out["lm_head.weight"] = bf16(model.lm_head)
    return out


def bf16_roundtrip_copy(model: DeepseekModel) -> DeepseekModel:
    """A CPU fp32 copy whose weights went through the checkpoint's dtypes (bf16, router fp32)."""
    ref = copy.deepcopy(model).to("cpu", torch.float32)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if not name.endswith("gate_weight"):
                p.copy_(p.to(torch.bfloat16).float())
    return ref.eval()


# ---------------------------------------------------------------------------------------------
# training helpers
# ---------------------------------------------------------------------------------------------

def causal_meta(batch: int, seq_len: int, device: torch.device):
    """No-cache metadata: B independent sequences of L tokens, flattened to T = B * L."""
    return build_attn_metadata(
        block_tables=torch.arange(batch, device=device)[:, None],
        num_computed=torch.zeros(batch, dtype=torch.long, device=device),
        query_lens=torch.full((batch,), seq_len, dtype=torch.long, device=device),
        block_size=seq_len)


class Batcher:
    """Random windows of seq_len + 1 tokens from one token stream; deterministic per seed."""

    def __init__(self, stream: np.ndarray, seq_len: int, device: torch.device, seed: int,
                 bos_fraction: float = 0.25):
        self.data = torch.from_numpy(stream.astype(np.int64)).to(device)
        self.seq_len = seq_len
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self.max_start = len(stream) - seq_len - 1
        if self.max_start <= 0:
            raise SystemExit(f"token stream of {len(stream)} tokens is shorter than --seq-len + 1")
        starts = np.flatnonzero(stream == 0)
        self.doc_starts = torch.from_numpy(starts[starts <= self.max_start].astype(np.int64))
        self.bos_fraction = bos_fraction
        self.span = torch.arange(seq_len + 1, device=device)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.max_start + 1, (batch,), generator=self.gen)
        at_doc = torch.rand(batch, generator=self.gen) < self.bos_fraction
        if len(self.doc_starts):
            pick = self.doc_starts[torch.randint(0, len(self.doc_starts), (batch,), generator=self.gen)]
            starts = torch.where(at_doc, pick, starts)
        return self.windows(starts)

    def windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.data[starts.to(self.device)[:, None] + self.span]  # [B, L + 1]
        return w[:, :-1].reshape(-1), w[:, 1:].reshape(-1)


def fixed_eval_starts(stream_len: int, seq_len: int, num: int, seed: int) -> torch.Tensor:
    """Evaluation windows: non-overlapping, evenly spread when the stream is long enough."""
    max_start = stream_len - seq_len - 1
    if (max_start + 1) // seq_len >= num:
        return (torch.arange(num) * ((max_start + 1) // num)).long()
    return torch.randint(0, max_start + 1, (num,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate(model, batcher: Batcher, starts: torch.Tensor, batch: int, meta_for, amp) -> float:
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        s = starts[i:i + batch]
        x, y = batcher.windows(s)
        with amp():
            logits = model(x, meta_for(len(s)), None, all_logits=True)
        total += F.cross_entropy(logits.float(), y, reduction="sum").item()
        count += y.numel()
    for moe in model.moe_layers().values():
        moe.tokens_per_expert.zero_()  # evaluation does not count towards load balancing
    return total / max(count, 1)


def update_router_bias(model: DeepseekModel, rate: float) -> list[float]:
    """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): bias += rate * sign(mean_load - load), then reset the
    counters. The update is centred (its mean over experts removed): a shift common to all experts changes
    no routing decision, and without it the biases drift upwards together. Returns each MoE layer's
    max/mean load this step."""
    ratios = []
    with torch.no_grad():
        for moe in model.moe_layers().values():
            load = moe.tokens_per_expert.float()
            mean = load.mean()
            if moe.e_score_correction_bias is not None and rate > 0:
                delta = rate * torch.sign(mean - load)
                moe.e_score_correction_bias.add_(delta - delta.mean())
            ratios.append(load.max() / mean.clamp(min=1.0))
            moe.tokens_per_expert.zero_()
    return [float(r) for r in torch.stack(ratios).cpu()] if ratios else []


@torch.no_grad()
def greedy(model, tok, prompt: str, max_new: int, device: torch.device, max_len: int) -> str:
    """Greedy continuation by re-running the whole sequence each token (no cache)."""
    ids = [0] + tok.encode(prompt, add_special_tokens=False).ids
    n_prompt = len(ids)
    for _ in range(max_new):
        ctx = ids[-max_len:]
        x = torch.tensor(ctx, dtype=torch.long, device=device)
        logits = model(x, causal_meta(1, len(ctx), device), None)  # [1, vocab] at the last token
        nxt = int(logits[0].argmax())
        if nxt == 1:
            break
        ids.append(nxt)
    return tok.decode(ids[n_prompt:], skip_special_tokens=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


# ---------------------------------------------------------------------------------------------
# output files
# ---------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
)


def write_tokenizer_files(out: Path, tok, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 0,
        "eos_token_id": 1,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": 128,
    }, indent=2) + "\n")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def write_training_md(out: Path, info: dict) -> None:
    load = "\n".join(f"| {layer} | {ratio:.2f} | {bias} |" for layer, ratio, bias in info["balance"])
    text = f"""# Training record of this checkpoint

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

## Data

Python {platform.python_version()} standard library sources under `{info['data']['root']}`
(`.py` files, sorted, skipping directories {', '.join(EXCLUDED_DIRS)}): {info['data']['n_train']} training
files ({info['data']['train_tokens']:,} tokens), {info['data']['n_val']} held-out validation files
({info['data']['val_tokens']:,} tokens). Each file is `<|bos|> text <|eos|>`. Tokenizer: byte-level BPE trained
with `tokenizers` on the training files, vocab {info['shape']['vocab_size']}.

Validation files: {', '.join(f'`{f}`' for f in info['data']['val_files'])}

## Training

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

Per MoE layer at the end: max/mean expert load (per step, averaged over the last logging interval; 1.00 is
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
    (out / "TRAINING.md").write_text(text)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

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


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    deadline = t_start + args.max_minutes * 60 if args.max_minutes else None
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    shape = dict(SHAPE, vocab_size=args.vocab_size)
    if args.seq_len > shape["max_position_embeddings"]:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds max_position_embeddings {shape['max_position_embeddings']}")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    log(f"device: {device_name(device)}")

    # ---- data ----
    data = prepare_data(args)
    tok, train_stream, val_stream = data["tokenizer"], data["train"], data["val"]

    # ---- model ----
    torch.manual_seed(args.seed)
    config = ModelConfig.from_dict(hf_config(shape))
    model = DeepseekModel(config, dtype=torch.float32)
    init_weights(model)
    model.to(device)
    make_autocast_safe(model)
    add_dropout(model, args.dropout)
    n_params, n_active = count_params(model)
    log(f"model: {n_params:,} parameters ({n_active:,} active per token), "
        f"~{n_params * 2 / 1e6:.1f} MB in bf16")

    use_amp = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def amp():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp)

    metas: dict[int, object] = {}

    def meta_for(batch: int):
        if batch not in metas:
            metas[batch] = causal_meta(batch, args.seq_len, device)
        return metas[batch]

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")
    warmup = max(1, min(args.warmup, args.steps // 10))

    train_batches = Batcher(train_stream, args.seq_len, device, args.seed)
    val_batches = Batcher(val_stream, args.seq_len, device, args.seed + 1)
    val_starts = fixed_eval_starts(len(val_stream), args.seq_len, args.eval_windows, args.seed + 2)
    train_eval_starts = fixed_eval_starts(len(train_stream), args.seq_len, args.eval_windows, args.seed + 3)
    eval_batch = min(args.batch_size, 16)

    # ---- train ----
    t_loop = time.time()
    loop_budget = (deadline - t_loop) if deadline else None
    if loop_budget is not None and loop_budget <= 0:
        raise SystemExit("--max-minutes already used up by data preparation")
    log(f"train: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr}, warmup {warmup}, "
        f"{'bf16 autocast' if use_amp else 'fp32'}"
        + (f", training stops at {loop_budget / 60:.1f} min from now" if loop_budget else ""))
    step, time_stop = 0, False
    interval_loss, interval_n, t_interval = 0.0, 0, time.time()
    balance: list[float] = []  # per MoE layer: mean over the last log interval of the step's max/mean load
    balance_sum: list[float] = []
    model.train()
    while step < args.steps:
        elapsed = time.time() - t_loop
        progress = step / args.steps
        if loop_budget:
            if elapsed >= loop_budget:
                time_stop = True
                break
            progress = max(progress, elapsed / loop_budget)
        if step < warmup:
            lr = args.lr * (step + 1) / warmup
        else:
            cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            lr = args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)
        for group in opt.param_groups:
            group["lr"] = lr

        x, y = train_batches.sample(args.batch_size)
        with amp():
            logits = model(x, meta_for(args.batch_size), None, all_logits=True)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        ratios = update_router_bias(model, args.bias_update_rate)
        balance_sum = [a + b for a, b in zip(balance_sum, ratios)] if balance_sum else ratios
        step += 1
        interval_loss += loss.item()
        interval_n += 1

        if step % args.log_every == 0 or step == args.steps:
            dt = time.time() - t_interval
            balance = [r / interval_n for r in balance_sum]
            log(f"step {step:5d} | loss {interval_loss / interval_n:.4f} | lr {lr:.2e} | "
                f"{interval_n / dt:.2f} steps/s, {interval_n * args.batch_size * args.seq_len / dt:,.0f} tok/s | "
                f"max/mean expert load per MoE layer {' '.join(f'{r:.2f}' for r in balance)} | "
                f"{time.time() - t_start:.0f}s")
            interval_loss, interval_n, t_interval, balance_sum = 0.0, 0, time.time(), []
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            t_eval = time.time()
            model.eval()
            v = evaluate(model, val_batches, val_starts, eval_batch, meta_for, amp)
            model.train()
            log(f"step {step:5d} | val loss {v:.4f}")
            t_interval += time.time() - t_eval  # keep evaluation out of the logged training speed

    if interval_n:
        balance = [r / interval_n for r in balance_sum]
    train_seconds = time.time() - t_loop
    log(f"train: {'stopped by --max-minutes' if time_stop else 'done'} after {step} steps in "
        f"{train_seconds:.1f}s ({step / max(train_seconds, 1e-9):.2f} steps/s)")

    # ---- final evaluation ----
    model.eval()
    val_loss = evaluate(model, val_batches, val_starts, eval_batch, meta_for, amp)
    train_loss = evaluate(model, train_batches, train_eval_starts, eval_batch, meta_for, amp)
    log(f"final: train loss {train_loss:.4f} | val loss {val_loss:.4f} (ppl {math.exp(val_loss):.1f})")

    # ---- save ----
    from safetensors.torch import save_file

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model)
    (out / "config.json").write_text(json.dumps(hf_config(shape), indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only
    write_tokenizer_files(out, tok, shape["max_position_embeddings"])
    log(f"saved: {out} ({len(tensors)} tensors)")

    # ---- verify: load back and compare against the in-memory model (weights rounded to bf16) ----
    from moeserve.model.loader import load_model
    from moeserve.model.weights import weight_specs

    loaded = load_model(out)
    expected = {s.name for s in weight_specs(loaded)}
    if set(tensors) != expected:
        raise SystemExit(f"checkpoint names differ from moeserve's loader: missing {sorted(expected - set(tensors))}"
                         f", unexpected {sorted(set(tensors) - expected)}")
    ref = bf16_roundtrip_copy(model)
    for (i, a), b in zip(loaded.moe_layers().items(), ref.moe_layers().values()):
        if not torch.equal(a.e_score_correction_bias, b.e_score_correction_bias):
            raise SystemExit(f"layer {i}: e_score_correction_bias differs after loading")
    vb = min(4, len(val_starts))
    x, _ = val_batches.windows(val_starts[:vb])
    x = x.cpu()
    meta_cpu = causal_meta(vb, args.seq_len, torch.device("cpu"))
    with torch.no_grad():
        got = loaded(x, meta_cpu, None, all_logits=True)
        want = ref(x, meta_cpu, None, all_logits=True)
    diff = float((got - want).abs().max())
    log(f"verify: loaded checkpoint vs in-memory model (bf16-rounded): max abs logit diff {diff:.3g}")
    if not diff <= 1e-3:
        raise SystemExit(f"verification failed: loaded logits differ by {diff}")

    sample = greedy(loaded, tok, SAMPLE_PROMPT, args.sample_tokens, torch.device("cpu"), args.seq_len)
    log(f"sample (greedy, loaded checkpoint):\n{SAMPLE_PROMPT}{sample}\n")

    # ---- TRAINING.md ----
    bias_rows = []
    for (i, moe), ratio in zip(model.moe_layers().items(), balance or [0.0] * len(model.moe_layers())):
        b = moe.e_score_correction_bias
        bias_rows.append((i, ratio, "[" + ", ".join(f"{v:+.3f}" for v in b.tolist()) + "]" if b is not None else "-"))
    info = dict(
        command=command, shape=shape, params=n_params, active=n_active, dir_bytes=0,
        data=dict(root=data["root"], n_train=len(data["train_files"]), n_val=len(data["val_files"]),
                  train_tokens=len(train_stream), val_tokens=len(val_stream), val_files=data["val_files"]),
        device=device_name(device), steps_done=step, steps_planned=args.steps, time_stop=time_stop,
        batch=args.batch_size, seq_len=args.seq_len, tokens_seen=step * args.batch_size * args.seq_len,
        epochs=step * args.batch_size * args.seq_len / len(train_stream), weight_decay=args.weight_decay,
        lr=args.lr, warmup=warmup, dropout=args.dropout, min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip,
        precision="bf16 autocast, fp32 master weights and router" if use_amp else "fp32",
        bias_rate=args.bias_update_rate, seed=args.seed, train_seconds=train_seconds,
        steps_per_s=step / max(train_seconds, 1e-9), total_seconds=0.0, eval_windows=len(val_starts),
        train_loss=train_loss, val_loss=val_loss, verify_diff=diff, balance=bias_rows, sample=sample,
        sample_tokens=args.sample_tokens)
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


if __name__ == "__main__":
    sys.exit(main())
