"""The Hugging Face reference run on the oracle's checkpoints (``oracle.py``): float32, eager attention.

Public API:
    load_reference(ckpt_dir) -> the transformers model
    reference_outputs(ckpt_dir, prompt_ids, max_new_tokens) -> (prefill_logits, greedy_ids)
    mtp_reference(ckpt_dir, prompt_ids) -> the MTP module's logits at every position but the last
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from oracle import MTP_FILE, model_classes


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _block_model(ckpt_dir: Path, layer: dict[str, torch.Tensor], shared_norm: torch.Tensor,
                 head: torch.Tensor) -> torch.nn.Module:
    """transformers' DeepSeek model of one layer holding the MTP block (its final norm is the shared head's
    norm, its LM head the shared head): the decoder block of the reference."""
    import tempfile

    from safetensors.torch import save_file

    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    n = config["num_hidden_layers"]
    is_moe = config.get("n_routed_experts") and n >= config.get("first_k_dense_replace", 0)
    config.update(num_hidden_layers=1, first_k_dense_replace=0 if is_moe else 1, num_nextn_predict_layers=0)
    tensors = {k.replace(f"model.layers.{n}.", "model.layers.0."): v for k, v in layer.items()}
    tensors.update({"model.embed_tokens.weight": torch.zeros_like(head), "model.norm.weight": shared_norm,
                    "lm_head.weight": head})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(Path(tmp) / "model.safetensors"))
        arch = {"deepseek_v2": "v2", "deepseek_v3": "v3"}[config["model_type"]]
        model = model_classes(arch)[1].from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def mtp_reference(ckpt_dir: Path, prompt_ids: list[int]) -> torch.Tensor:
    """The MTP module of ``ckpt_dir`` on ``prompt_ids``, written from the DeepSeek-V3 report's equations:
    for each position t < T-1, ``h'_t = eh_proj([enorm(emb(t+1)) ; hnorm(h_t)])`` (h_t: the main model's
    output after its final norm, from transformers; the embedding zeroed at position 0 and put first, as
    vLLM and SGLang load these checkpoints), then the decoder block (transformers' layer, causal over the
    module's own positions 0..T-2), then ``shared_head.head(shared_head.norm(.))``. Returns float32 logits
    [T-1, vocab]: row t predicts token t+2."""
    from safetensors.torch import load_file

    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    n, eps = config["num_hidden_layers"], config.get("rms_norm_eps", 1e-6)
    prefix = f"model.layers.{n}."
    tensors = {k[len(prefix):]: v.float() for k, v in load_file(str(Path(ckpt_dir) / MTP_FILE)).items()
               if k.startswith(prefix)}
    main = load_reference(ckpt_dir)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    h = main.model(ids).last_hidden_state[0, :-1]  # [T-1, hidden], after the final norm
    e = tensors["embed_tokens.weight"][ids[0, 1:]].clone()  # [T-1, hidden], tokens t+1
    e[0] = 0.0  # position 0
    x = torch.cat([_rms_norm(e, tensors["enorm.weight"], eps), _rms_norm(h, tensors["hnorm.weight"], eps)], -1)
    x = x @ tensors["eh_proj.weight"].T
    layer = {prefix + k: v for k, v in tensors.items()
             if k.split(".")[0] in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")}
    block = _block_model(ckpt_dir, layer, tensors["shared_head.norm.weight"], tensors["shared_head.head.weight"])
    positions = torch.arange(x.shape[0]).unsqueeze(0)
    return block(inputs_embeds=x.unsqueeze(0), position_ids=positions).logits[0].float()


def load_reference(ckpt_dir: Path) -> torch.nn.Module:
    """Load ``ckpt_dir`` with the matching HF class in float32 with eager attention."""
    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    arch = {"deepseek_v2": "v2", "deepseek_v3": "v3"}[config["model_type"]]
    _, model_cls = model_classes(arch)
    model = model_cls.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def reference_outputs(
    ckpt_dir: Path, prompt_ids: list[int], max_new_tokens: int
) -> tuple[torch.Tensor, list[int]]:
    """Run the HF reference on ``prompt_ids``.

    Returns ``(prefill_logits, continuation)``: float32 logits ``[len(prompt_ids), vocab]`` of
    a single forward pass over the prompt, and exactly ``max_new_tokens`` greedy token ids
    (plain argmax at every step; EOS is an ordinary token and never stops or is masked).
    """
    model = load_reference(ckpt_dir)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    logits = model(input_ids).logits[0].float()
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    continuation = out[0, len(prompt_ids):].tolist()
    assert len(continuation) == max_new_tokens, (len(continuation), max_new_tokens)
    return logits, continuation
