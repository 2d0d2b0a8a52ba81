"""The layer split across pipeline stages: per-layer costs and an exact min-max contiguous split.

Pure functions of the model config; ``plan.make_plan`` uses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import accumulate

from moeserve.comm.topology import InfeasiblePlanError
from moeserve.model.config import ModelConfig

ROUTER_BYTES = 4  # the router weight (and V3's score-correction bias) stay float32 whatever the model dtype

# ---------------------------------------------------------------------------------------------
# sizes (parameter counts on one rank)
# ---------------------------------------------------------------------------------------------

def attention_params(config: ModelConfig, tp: int = 1) -> int:
    """MLA parameters one tp rank holds (including the layer's two RMSNorms).

    Heads are divided over tp (``q_b_proj``/``q_proj``, ``kv_b_proj``, ``o_proj``); the low-rank down
    projections ``q_a_proj`` and ``kv_a_proj_with_mqa`` and the norms are replicated, as in DeepSeek's own
    tensor-parallel inference code (they are small and their output, the latent, is needed whole).
    """
    h, local_heads = config.hidden_size, config.num_attention_heads // tp
    replicated = 2 * h + config.kv_cache_dim * h + config.kv_lora_rank
    if config.q_lora_rank is None:
        q = local_heads * config.qk_head_dim * h
    else:
        replicated += config.q_lora_rank * h + config.q_lora_rank
        q = local_heads * config.qk_head_dim * config.q_lora_rank
    kv_b = local_heads * (config.qk_nope_head_dim + config.v_head_dim) * config.kv_lora_rank
    o = h * local_heads * config.v_head_dim
    return replicated + q + kv_b + o


def mlp_params(hidden: int, intermediate: int) -> int:
    """SwiGLU: fused gate/up [2I, H] plus down [H, I]."""
    return 3 * hidden * intermediate


def router_bytes(config: ModelConfig) -> int:
    bias = config.n_routed_experts if config.topk_method == "noaux_tc" else 0
    return (config.n_routed_experts * config.hidden_size + bias) * ROUTER_BYTES


# ---------------------------------------------------------------------------------------------
# layer split
# ---------------------------------------------------------------------------------------------

def layer_costs(config: ModelConfig) -> list[float]:
    """Relative cost of each decoder layer in a decode step: [num_hidden_layers].

    Decode is memory-bound, so the proxy is the weight elements one token reads: all of attention plus
    the dense MLP for a dense layer; attention, router, shared experts and ``top_k`` routed experts for a
    MoE layer (a token touches only its own experts, so the experts a layer *holds* do not count).
    """
    h = config.hidden_size
    attn = attention_params(config)
    dense = mlp_params(h, config.intermediate_size)
    moe = (config.n_routed_experts * h + mlp_params(h, config.moe_intermediate_size)
           * (config.n_shared_experts + config.num_experts_per_tok))
    return [float(attn + (moe if config.is_moe_layer(i) else dense)) for i in range(config.num_hidden_layers)]


def embedding_cost(config: ModelConfig) -> float:
    """Extra cost of the first stage: the embedding is a gather of one row per token."""
    return float(config.hidden_size)


def head_cost(config: ModelConfig) -> float:
    """Extra cost of the last stage: the final norm and the LM head, a full [vocab, hidden] matmul."""
    return float(config.hidden_size * (config.vocab_size + 1))


def split_layers(costs: list[float], pp: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """Contiguous split of layers with ``costs`` [L] into ``pp`` stages -> layers per stage [pp].

    Exact: minimises the largest stage cost (stage 0 also pays ``first_extra``, the last ``last_extra``),
    and among those splits the sum of squared stage costs, so stages off the bottleneck are balanced too.
    Ties go to the split with more layers in earlier stages. Every stage gets at least one layer.
    O(pp * L^2) dynamic programming; deterministic.
    """
    n = len(costs)
    if not 1 <= pp <= n:
        raise InfeasiblePlanError(f"cannot split {n} layers into {pp} pipeline stages (need 1 <= pp <= {n})")
    prefix = [0.0, *accumulate(costs)]

    def stage_cost(stage: int, start: int, end: int) -> float:
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == pp - 1 else 0.0)
        return prefix[end] - prefix[start] + extra

    bounds = _balanced_cuts(n, pp, stage_cost, _min_bottleneck(n, pp, stage_cost))
    return [bounds[k + 1] - bounds[k] for k in range(pp)]


def _min_bottleneck(n: int, pp: int, stage_cost: Callable[[int, int, int], float]) -> float:
    """Smallest achievable maximum stage cost over all splits of n layers into pp stages."""
    # worst[s][i]: smallest bottleneck of s stages covering layers [0, i)
    worst = [[math.inf] * (n + 1) for _ in range(pp + 1)]
    worst[0][0] = 0.0
    for s in range(1, pp + 1):
        for i in range(s, n - (pp - s) + 1):
            worst[s][i] = min(max(worst[s - 1][j], stage_cost(s - 1, j, i)) for j in range(s - 1, i))
    return worst[pp][n]


def _balanced_cuts(n: int, pp: int, stage_cost: Callable[[int, int, int], float],
                   bottleneck: float) -> list[int]:
    """Stage boundaries [pp + 1] with every stage <= bottleneck and the least sum of squared costs."""
    # squares[s][i]: least sum of squares of s stages covering [0, i); cut[s][i]: where the s-th starts
    squares = [[math.inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    squares[0][0] = 0.0
    for s in range(1, pp + 1):
        for i in range(s, n - (pp - s) + 1):
            for j in range(i - 1, s - 2, -1):  # later cuts first: ties keep earlier stages larger
                c = stage_cost(s - 1, j, i)
                # NOTE: c is computed exactly as when the bottleneck was found, so `<=` is exact
                if c <= bottleneck and squares[s - 1][j] + c * c < squares[s][i]:
                    squares[s][i], cut[s][i] = squares[s - 1][j] + c * c, j
    bounds = [n]
    for s in range(pp, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    return bounds[::-1]


def check_split(stage_layers: list[int], num_layers: int, pp: int) -> None:
    """Raise InfeasiblePlanError unless ``stage_layers`` [pp] is a valid split of ``num_layers``."""
    if len(stage_layers) != pp:
        raise InfeasiblePlanError(f"pp_layers {stage_layers} has {len(stage_layers)} stage(s), pp is {pp}")
    if any(n < 1 for n in stage_layers):
        raise InfeasiblePlanError(f"pp_layers {stage_layers}: every stage needs at least one layer")
    if sum(stage_layers) != num_layers:
        raise InfeasiblePlanError(f"pp_layers {stage_layers} sums to {sum(stage_layers)}, "
                                  f"the model has {num_layers} layers")


def layer_ranges(stage_layers: list[int] | tuple[int, ...]) -> list[range]:
    """Layers per stage [pp] -> the layer ids of each stage, e.g. [3, 2] -> [range(0, 3), range(3, 5)]."""
    ends = list(accumulate(stage_layers))
    return [range(end - n, end) for n, end in zip(stage_layers, ends)]


def parse_pp_layers(text: str, num_layers: int, pp: int) -> list[int]:
    """``"14,13"`` -> [14, 13], checked against the model's layer count and ``pp``."""
    try:
        stage_layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"pp_layers {text!r} must be comma-separated layer counts, e.g. '14,13'") from None
    check_split(stage_layers, num_layers, pp)
    return stage_layers


