"""The MoE router as pure tensor functions.

Scores are softmax (DeepSeek-V2) or sigmoid (V3) over the routed experts; top-k selection is greedy,
group-limited greedy (V2: keep the ``topk_group`` groups with the highest max score) or ``noaux_tc``
(V3: groups ranked by the sum of their top-2 biased scores; the correction bias picks experts but does not
weigh them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GateSpec:
    num_experts: int
    top_k: int
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0


def _group_mask(choice: torch.Tensor, spec: GateSpec, group_score: str) -> torch.Tensor:
    """choice: [T, E] -> bool mask [T, E] of experts in the selected groups."""
    num_tokens = choice.shape[0]
    grouped = choice.view(num_tokens, spec.n_group, -1)  # [T, G, E/G]
    if group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:  # "top2sum"
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    group_idx = group_scores.topk(spec.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, -1)


def route(logits: torch.Tensor, spec: GateSpec, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, E] float32 router logits -> (weights [T, top_k] float32, expert ids [T, top_k] int64)."""
    scores = logits.softmax(dim=-1) if spec.scoring_func == "softmax" else logits.sigmoid()
    if spec.topk_method == "greedy":
        weights, ids = scores.topk(spec.top_k, dim=-1, sorted=False)
    elif spec.topk_method == "group_limited_greedy":
        mask = _group_mask(scores, spec, "max")
        weights, ids = scores.masked_fill(~mask, 0.0).topk(spec.top_k, dim=-1, sorted=False)
    else:  # noaux_tc
        choice = scores if bias is None else scores + bias
        mask = _group_mask(choice, spec, "top2sum")
        ids = choice.masked_fill(~mask, float("-inf")).topk(spec.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
    if spec.norm_topk_prob and spec.top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * spec.routed_scaling_factor, ids


def router_logits(x: torch.Tensor, weight: torch.Tensor, weight_in_x_dtype: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x: [T, hidden], weight: [E, hidden] -> [T, E] in float32 (the router is always computed in fp32).

    ``weight_in_x_dtype``: the same values in x's dtype (``exact_copy``), where they fit it, as a bf16
    checkpoint's router weights do: a product of two bf16 values is exact in float32, so one GEMM of the
    bf16 operands that sums in float32 gives the float32 logits up to the order of the sums, without a cast of x
    or a float32 GEMM (CUDA: two launches, the second on CUDA cores, become one on tensor cores)."""
    if weight_in_x_dtype is not None and weight_in_x_dtype.dtype == x.dtype:
        return torch.mm(x, weight_in_x_dtype.t(), out_dtype=torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def exact_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``weight`` (float32) in ``dtype`` where every value survives the round trip and this torch multiplies
    ``dtype`` operands into float32 on the weight's device (``torch.mm(..., out_dtype=)``), else None. Waits
    for the device: call it once per weight version, outside graph capture."""
    copy = weight.detach().to(dtype)
    if not torch.equal(copy.float(), weight.detach()):
        return None
    try:
        torch.mm(copy[:1], copy[:1].t(), out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):  # an older torch, or a device without the kernel
        return None
    return copy
