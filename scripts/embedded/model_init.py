"""The model for training: weight init, MoE adjustments for autocast, training-only dropout, and the
auxiliary-loss-free router bias update."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.layers import RMSNorm

from .common import hf_config, log


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


def make_autocast_safe(model: DeepseekModel) -> None:
    """Adjust moeserve's MoE layers (in this process only) for training under bf16 autocast with fp32
    master weights:

    * the per-expert loop (``MoE.routed``, the path the fp32 reference tests pin down) is used on every
      device: the grouped-GEMM path that ``MoE`` picks on CUDA (``torch._grouped_mm``) is not autocast-aware
      and needs weights in the activation dtype, while training keeps fp32 master weights;
    * a forward pre-hook hands each MoE its input in the autocast dtype, so the routed experts accumulate in
      bf16 as at bf16 inference and the (fp32) router sees the bf16-rounded activations (the MoE returns
      bf16 to the fp32 residual stream, which promotes it back). moeserve's ``MoE.routed`` now casts expert
      outputs to its accumulator's dtype and ``router_logits`` runs with autocast off, so neither this hook
      nor the former fp32 ``router_logits`` replacement is needed to avoid errors any more; the hook stays
      so that training numerics under autocast are unchanged.
    """
    def pre_hook(module, args):
        x = args[0]
        if torch.is_autocast_enabled(x.device.type):
            return (x.to(torch.get_autocast_dtype(x.device.type)),) + tuple(args[1:])
        return None

    for moe in model.moe_layers().values():
        moe.register_forward_pre_hook(pre_hook)
        if hasattr(moe, "use_grouped_mm"):
            moe.use_grouped_mm = lambda x: False  # type: ignore[method-assign]  # shadows the static method


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

    for i, layer in enumerate(model.decoder_layers().values()):
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


def build_model(shape: dict, seed: int, dropout: float, device: torch.device) -> tuple[DeepseekModel, int, int]:
    """Seeded fp32 model on ``device``, ready to train -> (model, total parameters, active per token)."""
    torch.manual_seed(seed)
    config = ModelConfig.from_dict(hf_config(shape))
    model = DeepseekModel(config, dtype=torch.float32)
    init_weights(model)
    model.to(device)
    make_autocast_safe(model)
    add_dropout(model, dropout)
    n_params, n_active = count_params(model)
    log(f"model: {n_params:,} parameters ({n_active:,} active per token), "
        f"~{n_params * 2 / 1e6:.1f} MB in bf16")
    return model, n_params, n_active


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
