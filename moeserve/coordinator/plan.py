"""The parallel plan: which layers each pipeline stage runs, which experts each rank holds, and what fits.

Everything here is a pure function of the model config and the topology (``ParallelDims``); no weights,
no processes. ``make_plan`` is the one entry point the launcher uses; ``format_plan`` prints it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeserve.comm.topology import ParallelDims
from moeserve.model.config import ModelConfig

if TYPE_CHECKING:
    from moeserve.experts.moe import ExpertPlacement

ROUTER_BYTES = 4  # the router weight (and V3's score-correction bias) stay float32 whatever the model dtype
MIN_CACHE_TOKENS = 64  # one accelerator-sized cache block: a rank that cannot hold it cannot serve


class InfeasiblePlanError(ValueError):
    """This model cannot be laid out on this topology (or in this memory); the message says why."""


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


# ---------------------------------------------------------------------------------------------
# expert placement
# ---------------------------------------------------------------------------------------------

def expert_placement(num_experts: int, ep: int, placement_file: Path | None = None) -> list[list[int]]:
    """Per EP rank, the logical expert ids it holds in physical-slot order: [ep][slots_per_rank].

    Default: contiguous ranges (rank r holds ``r*E/ep .. (r+1)*E/ep - 1``). A placement file is JSON::

        {"phy2log": [[0, 1, 2, 7], [3, 4, 5, 6], ...]}   # one list per EP rank: the logical expert
                                                          # held in each of its physical slots
    Every rank has the same number of slots; a logical expert may sit on several ranks (a redundant copy
    of a hot expert) but at most once per rank; every logical expert sits somewhere. The same placement is
    used for every MoE layer. Each row converts to ``ExpertPlacement(num_experts, tuple(row))``.
    """
    if placement_file is None:
        if num_experts % ep:
            raise InfeasiblePlanError(f"n_routed_experts ({num_experts}) is not divisible by ep ({ep}); "
                                      "give a placement file to place them unevenly")
        per_rank = num_experts // ep
        return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(ep)]
    try:
        raw = json.loads(Path(placement_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"placement file {placement_file}: {e}") from e
    phy2log = raw.get("phy2log") if isinstance(raw, dict) else None
    try:
        check_placement(phy2log, num_experts, ep)
    except ValueError as e:
        raise ValueError(f"placement file {placement_file}: {e}") from None
    return [list(row) for row in phy2log]  # type: ignore[union-attr]


def check_placement(phy2log: Any, num_experts: int, ep: int) -> None:
    """Raise ValueError unless ``phy2log`` is a valid [ep][slots] list of logical expert ids."""
    if not isinstance(phy2log, list) or not all(isinstance(row, list) for row in phy2log):
        raise ValueError('expected {"phy2log": [[ids of rank 0], [ids of rank 1], ...]}')
    if len(phy2log) != ep:
        raise ValueError(f"phy2log has {len(phy2log)} rank(s), ep is {ep}")
    sizes = {len(row) for row in phy2log}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every rank needs the same, non-zero number of slots, got {sorted(sizes)}")
    for rank, row in enumerate(phy2log):
        bad = [e for e in row if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"rank {rank}: expert ids must be integers in 0..{num_experts - 1}, got {bad[:5]}")
        if len(set(row)) != len(row):
            raise ValueError(f"rank {rank} holds an expert twice: {row}")
    missing = sorted(set(range(num_experts)) - {e for row in phy2log for e in row})
    if missing:
        raise ValueError(f"logical experts placed on no rank: {compact_ranges(missing)}")


def compact_ranges(ids: list[int] | tuple[int, ...]) -> str:
    """[0, 1, 2, 7, 3, 4] -> '0-2,7,3-4' (runs in the given order)."""
    runs: list[list[int]] = []
    for e in ids:
        if runs and e == runs[-1][1] + 1:
            runs[-1][1] = e
        else:
            runs.append([e, e])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes one rank holds, by part."""

    embedding: int = 0
    attention: int = 0  # MLA and the layers' RMSNorms
    dense_mlp: int = 0
    router: int = 0
    shared_experts: int = 0
    routed_experts: int = 0
    head: int = 0  # final norm and LM head

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


@dataclass(frozen=True)
class ParallelPlan:
    """Layer split, expert placement and memory of one replica (all replicas are identical).

    Per-rank tuples are indexed by the rank inside the replica (``stage * tp + tp_rank``).
    """

    config: ModelConfig
    dims: ParallelDims
    dtype_bytes: int
    stage_layers: tuple[int, ...]  # [pp] layers per stage
    expert_ids: tuple[tuple[int, ...], ...]  # [ep][slots] logical expert per physical slot
    rank_weights: tuple[WeightBytes, ...]  # [pp * tp]
    kv_cache_bytes: tuple[int, ...] | None = None  # [pp * tp] cache budget per rank; None = not given

    def __post_init__(self) -> None:
        check_split(list(self.stage_layers), self.config.num_hidden_layers, self.dims.pp)
        if len(self.expert_ids) != self.dims.ep:
            raise ValueError(f"expert_ids has {len(self.expert_ids)} EP rank(s), ep is {self.dims.ep}")
        sizes = [len(self.rank_weights)] + ([] if self.kv_cache_bytes is None else [len(self.kv_cache_bytes)])
        if any(size != self.dims.ranks_per_replica for size in sizes):
            raise ValueError(f"per-rank tuples must have {self.dims.ranks_per_replica} entries, got {sizes}")

    @property
    def stage_ranges(self) -> list[range]:
        """Layer ids of each stage: [pp] contiguous ranges."""
        return layer_ranges(self.stage_layers)

    def stage_of_layer(self, layer_id: int) -> int:
        for stage, layers in enumerate(self.stage_ranges):
            if layer_id in layers:
                return stage
        raise ValueError(f"layer {layer_id} is not in 0..{self.config.num_hidden_layers - 1}")

    def cache_bytes_per_token(self, stage: int) -> int:
        """Latent-cache bytes one token takes on each rank of ``stage`` (every tp rank holds the full
        latent: MLA's compressed KV is shared by all heads, so it is not split over tp)."""
        return self.stage_layers[stage] * self.config.kv_cache_dim * self.dtype_bytes

    @property
    def kv_tokens_per_rank(self) -> list[int] | None:
        """Tokens of latent cache each rank of the replica can hold: [pp * tp], or None without a budget."""
        if self.kv_cache_bytes is None:
            return None
        tp = self.dims.tp
        return [b // self.cache_bytes_per_token(r // tp) for r, b in enumerate(self.kv_cache_bytes)]

    @property
    def kv_capacity_tokens(self) -> int | None:
        """Tokens one replica can cache: every stage holds every token, so the smallest rank decides."""
        per_rank = self.kv_tokens_per_rank
        return None if per_rank is None else min(per_rank)

    def experts_of(self, rank: int) -> tuple[int, ...]:
        """Logical experts (physical-slot order) the global ``rank`` holds."""
        return self.expert_ids[self.dims.ep_rank(rank)]

    def placement(self, rank: int) -> ExpertPlacement:
        from moeserve.experts.moe import ExpertPlacement

        return ExpertPlacement(self.config.n_routed_experts, self.experts_of(rank))

    @property
    def total_weight_bytes(self) -> int:
        """Weight bytes over every rank of every replica (replicated parts counted on each rank)."""
        return self.dims.replicas * sum(w.total for w in self.rank_weights)


def check_shapes(config: ModelConfig, dims: ParallelDims, has_placement_file: bool = False) -> None:
    """Raise InfeasiblePlanError when a dimension that must divide evenly does not."""
    tp, ep = dims.tp, dims.ep
    if dims.pp > config.num_hidden_layers:
        raise InfeasiblePlanError(f"pp ({dims.pp}) is more stages than the model has layers "
                                  f"({config.num_hidden_layers})")
    checks = [("num_attention_heads", config.num_attention_heads, tp, True),
              ("vocab_size", config.vocab_size, tp, True),
              ("intermediate_size", config.intermediate_size, tp,
               any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers))),
              ("moe_intermediate_size", config.moe_intermediate_size, tp, config.n_routed_experts > 0 and ep == 1),
              ("the shared experts' size n_shared_experts * moe_intermediate_size",
               config.n_shared_experts * config.moe_intermediate_size, tp, config.n_routed_experts > 0)]
    for name, size, degree, applies in checks:
        if applies and size % degree:
            raise InfeasiblePlanError(f"{name} ({size}) is not divisible by tp ({degree})")
    if config.n_routed_experts and ep > 1 and not has_placement_file and config.n_routed_experts % ep:
        raise InfeasiblePlanError(f"n_routed_experts ({config.n_routed_experts}) is not divisible by ep ({ep}); "
                                  "give a placement file to place them unevenly")


def rank_weight_bytes(config: ModelConfig, dims: ParallelDims, layers: range, num_slots: int,
                      dtype_bytes: int) -> WeightBytes:
    """Weights of one rank of the stage running ``layers`` that holds ``num_slots`` routed experts.

    Attention, dense MLPs and shared experts are split over tp; routed experts over ep (each whole), or,
    when ep == 1, every expert's intermediate dim over tp. Embedding and LM head are split by vocab.
    """
    h, tp, n = config.hidden_size, dims.tp, config.num_hidden_layers
    num_moe = sum(config.is_moe_layer(i) for i in layers)
    expert_inter = config.moe_intermediate_size // tp if dims.ep == 1 else config.moe_intermediate_size
    vocab_shard = config.vocab_size // tp * h
    # NOTE: with tied embeddings a single stage holds one matrix; a separate last stage needs its own copy
    head_shares_embedding = config.tie_word_embeddings and layers.start == 0
    return WeightBytes(
        embedding=vocab_shard * dtype_bytes if layers.start == 0 else 0,
        attention=len(layers) * attention_params(config, tp) * dtype_bytes,
        dense_mlp=(len(layers) - num_moe) * mlp_params(h, config.intermediate_size // tp) * dtype_bytes,
        router=num_moe * router_bytes(config),
        shared_experts=num_moe * mlp_params(h, config.n_shared_experts * config.moe_intermediate_size // tp)
        * dtype_bytes,
        routed_experts=num_moe * num_slots * mlp_params(h, expert_inter) * dtype_bytes,
        head=(h + (0 if head_shares_embedding else vocab_shard)) * dtype_bytes if layers.stop == n else 0)


def make_plan(config: ModelConfig, dims: ParallelDims, dtype_bytes: int,
              kv_cache_bytes_per_rank: int | None = None, memory_per_rank: int | None = None,
              pp_layers: list[int] | None = None, placement_file: Path | None = None) -> ParallelPlan:
    """Lay ``config`` out on one replica of ``dims``; raise InfeasiblePlanError saying why it cannot.

    Without ``pp_layers`` the layers are split by ``split_layers`` over ``layer_costs``. The cache budget
    of a rank is ``kv_cache_bytes_per_rank`` if given, else what ``memory_per_rank`` leaves after weights.
    """
    check_shapes(config, dims, placement_file is not None)
    if pp_layers is None:
        pp_layers = split_layers(layer_costs(config), dims.pp, embedding_cost(config), head_cost(config))
    check_split(pp_layers, config.num_hidden_layers, dims.pp)
    expert_ids = expert_placement(config.n_routed_experts, dims.ep, placement_file)
    layers = layer_ranges(pp_layers)
    weights = tuple(rank_weight_bytes(config, dims, layers[dims.coord(rank).pp_stage],
                                      len(expert_ids[dims.ep_rank(rank)]), dtype_bytes)
                    for rank in range(dims.ranks_per_replica))
    plan = ParallelPlan(config, dims, dtype_bytes, tuple(pp_layers), tuple(tuple(r) for r in expert_ids),
                        weights)
    if kv_cache_bytes_per_rank is None and memory_per_rank is None:
        return plan
    return dataclasses.replace(plan, kv_cache_bytes=_cache_budgets(plan, kv_cache_bytes_per_rank,
                                                                    memory_per_rank))


def _cache_budgets(plan: ParallelPlan, kv_cache_bytes: int | None, memory: int | None) -> tuple[int, ...]:
    """Cache bytes per rank [pp * tp]; raise InfeasiblePlanError if a rank's weights + cache overflow."""
    budgets = []
    for rank, w in enumerate(plan.rank_weights):
        stage = rank // plan.dims.tp
        min_cache = MIN_CACHE_TOKENS * plan.cache_bytes_per_token(stage)
        cache = kv_cache_bytes if kv_cache_bytes is not None else max(0, (memory or 0) - w.total)
        if memory is not None and w.total + max(cache, min_cache) > memory:
            need = "" if kv_cache_bytes is None else f" + {kv_cache_bytes} bytes of KV cache"
            raise InfeasiblePlanError(
                f"rank {rank} (stage {stage}, tp rank {rank % plan.dims.tp}) needs {w.total} bytes of weights"
                f"{need} (at least {min_cache} bytes of cache for {MIN_CACHE_TOKENS} tokens), "
                f"more than memory_per_rank = {memory} bytes")
        if cache < min_cache:
            raise InfeasiblePlanError(f"rank {rank}: kv cache of {cache} bytes holds fewer than "
                                      f"{MIN_CACHE_TOKENS} tokens ({min_cache} bytes)")
        budgets.append(cache)
    return tuple(budgets)


# ---------------------------------------------------------------------------------------------
# the human table
# ---------------------------------------------------------------------------------------------

def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def format_plan(plan: ParallelPlan) -> str:
    """The plan as a table: stages (layers, ranks, cache per token), then one row per rank of a replica."""
    c, dims = plan.config, plan.dims
    lines = [f"topology: {dims.describe()}",
             f"model:    {c.num_hidden_layers} layers, {c.n_routed_experts} routed experts "
             f"(top-{c.num_experts_per_tok}), {plan.dtype_bytes}-byte weights",
             "", f"{'stage':>5}  {'layers':<12}{'count':>5}  {'ranks':<12}cache/token"]
    for s, r in enumerate(plan.stage_ranges):
        ranks = dims.stage_ranks(0, s)
        lines.append(f"{s:>5}  {f'{r.start}-{r.stop - 1}':<12}{len(r):>5}  "
                     f"{compact_ranges(ranks):<12}{plan.cache_bytes_per_token(s)} B")
    tokens = plan.kv_tokens_per_rank
    lines += ["", f"{'rank':>4}  {'stage':>5}  {'tp':>3}  {'experts':<16}{'weights':>12}  kv tokens"]
    for rank, w in enumerate(plan.rank_weights):
        lines.append(f"{rank:>4}  {rank // dims.tp:>5}  {rank % dims.tp:>3}  "
                     f"{compact_ranges(plan.experts_of(rank)):<16}{_size(w.total):>12}  "
                     f"{'-' if tokens is None else tokens[rank]}")
    if dims.replicas > 1:
        lines.append(f"(replicas 1..{dims.replicas - 1} repeat this layout on ranks offset by "
                     f"{dims.ranks_per_replica})")
    lines.append(f"total weights: {_size(plan.total_weight_bytes)}"
                 + ("" if plan.kv_capacity_tokens is None else
                    f"; kv capacity per replica: {plan.kv_capacity_tokens} tokens"))
    return "\n".join(lines)
