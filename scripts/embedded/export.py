"""Saving: the checkpoint in DeepSeek's Hugging Face tensor names plus config / tokenizer files, loading it
back with moeserve's loader to check the logits, and greedy sampling from the loaded model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from moeserve.experts.moe import MoE
from moeserve.model.deepseek import DecoderLayer, DeepseekModel
from moeserve.model.layers import MLP

from .batches import Batcher, causal_meta
from .common import BOS, EOS, hf_config, log

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.bfloat16).contiguous().clone()


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().clone()


def _mlp_tensors(prefix: str, m: MLP) -> dict[str, torch.Tensor]:
    inter = m.intermediate_size
    return {f"{prefix}.gate_proj.weight": _bf16(m.gate_up_proj[:inter]),
            f"{prefix}.up_proj.weight": _bf16(m.gate_up_proj[inter:]),
            f"{prefix}.down_proj.weight": _bf16(m.down_proj)}


def _attn_tensors(p: str, layer: DecoderLayer) -> dict[str, torch.Tensor]:
    attn = layer.self_attn
    out = {f"{p}.input_layernorm.weight": _bf16(layer.input_layernorm.weight),
           f"{p}.post_attention_layernorm.weight": _bf16(layer.post_attention_layernorm.weight)}
    for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        if getattr(attn, name, None) is not None:
            out[f"{p}.self_attn.{name}.weight"] = _bf16(getattr(attn, name))
    for name in ("q_a_layernorm", "kv_a_layernorm"):
        if getattr(attn, name, None) is not None:
            out[f"{p}.self_attn.{name}.weight"] = _bf16(getattr(attn, name).weight)
    return out


def _moe_tensors(p: str, moe: MoE) -> dict[str, torch.Tensor]:
    out = {f"{p}.mlp.gate.weight": _fp32(moe.gate_weight)}
    if moe.e_score_correction_bias is not None:
        out[f"{p}.mlp.gate.e_score_correction_bias"] = _fp32(moe.e_score_correction_bias)
    inter = moe.w2.shape[-1]
    for slot, e in enumerate(moe.placement.local_logical_ids):
        out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = _bf16(moe.w13[slot, :inter])
        out[f"{p}.mlp.experts.{e}.up_proj.weight"] = _bf16(moe.w13[slot, inter:])
        out[f"{p}.mlp.experts.{e}.down_proj.weight"] = _bf16(moe.w2[slot])
    if moe.shared_experts is not None:
        out.update(_mlp_tensors(f"{p}.mlp.shared_experts", moe.shared_experts))
    return out


def checkpoint_tensors(model: DeepseekModel) -> dict[str, torch.Tensor]:
    """moeserve's fused layout -> DeepSeek's Hugging Face tensor names (bf16; router weight and bias fp32)."""
    assert model.embed_tokens is not None
    out = {"model.embed_tokens.weight": _bf16(model.embed_tokens)}
    for key, layer in model.decoder_layers().items():
        p = f"model.layers.{key}"
        out.update(_attn_tensors(p, layer))
        if isinstance(layer.mlp, MoE):
            out.update(_moe_tensors(p, layer.mlp))
        else:
            out.update(_mlp_tensors(f"{p}.mlp", layer.mlp))
    out["model.norm.weight"] = _bf16(model.norm.weight)
    out["lm_head.weight"] = _bf16(model.lm_head)
    return out


def bf16_roundtrip_copy(model: DeepseekModel) -> DeepseekModel:
    """A CPU fp32 copy whose weights went through the checkpoint's dtypes (bf16, router fp32)."""
    ref = copy.deepcopy(model).to("cpu", torch.float32)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if not name.endswith("gate_weight"):
                p.copy_(p.to(torch.bfloat16).float())
    return ref.eval()


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


def save_checkpoint(out: Path, model: DeepseekModel, shape: dict, tok) -> dict[str, torch.Tensor]:
    """config.json, model.safetensors and the tokenizer files under ``out`` -> the saved tensors."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model)
    (out / "config.json").write_text(json.dumps(hf_config(shape), indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only
    write_tokenizer_files(out, tok, shape["max_position_embeddings"])
    log(f"saved: {out} ({len(tensors)} tensors)")
    return tensors


def _check_names(loaded: DeepseekModel, tensors: dict[str, torch.Tensor]) -> None:
    """The checkpoint's names are exactly the ones moeserve's loader reads."""
    from moeserve.model.weights import weight_specs

    expected = {s.name for s in weight_specs(loaded)}
    if set(tensors) != expected:
        raise SystemExit(f"checkpoint names differ from moeserve's loader: missing {sorted(expected - set(tensors))}"
                         f", unexpected {sorted(set(tensors) - expected)}")


def _check_biases(loaded: DeepseekModel, ref: DeepseekModel) -> None:
    for (i, a), b in zip(loaded.moe_layers().items(), ref.moe_layers().values()):
        assert a.e_score_correction_bias is not None and b.e_score_correction_bias is not None
        if not torch.equal(a.e_score_correction_bias, b.e_score_correction_bias):
            raise SystemExit(f"layer {i}: e_score_correction_bias differs after loading")


def verify_checkpoint(out: Path, model: DeepseekModel, tensors: dict[str, torch.Tensor], val: Batcher,
                      val_starts: torch.Tensor, seq_len: int) -> tuple[DeepseekModel, float]:
    """Load ``out`` back and compare its logits with the in-memory model's (weights rounded to bf16) on a few
    validation windows -> (loaded model, max abs logit difference)."""
    from moeserve.model.loader import load_model

    loaded = load_model(out)
    _check_names(loaded, tensors)
    ref = bf16_roundtrip_copy(model)
    _check_biases(loaded, ref)
    vb = min(4, len(val_starts))
    x, _ = val.windows(val_starts[:vb])
    x = x.cpu()
    meta_cpu = causal_meta(vb, seq_len, torch.device("cpu"))
    with torch.no_grad():
        got = loaded(x, meta_cpu, None, all_logits=True)
        want = ref(x, meta_cpu, None, all_logits=True)
    diff = float((got - want).abs().max())
    log(f"verify: loaded checkpoint vs in-memory model (bf16-rounded): max abs logit diff {diff:.3g}")
    if not diff <= 1e-3:
        raise SystemExit(f"verification failed: loaded logits differ by {diff}")
    return loaded, diff


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
