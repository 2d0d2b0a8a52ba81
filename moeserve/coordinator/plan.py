"""The parallel plan: which layers each pipeline stage runs, which experts each rank holds, and what fits.

Everything here is a pure function of the model config and the topology (``ParallelDims``); no weights,
no processes. ``make_plan`` is the one entry point the launcher uses; ``format_plan`` prints it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moeserve.comm.topology import (
    InfeasiblePlanError,  # noqa: F401  (re-exported)
    ParallelDims,
)
from moeserve.coordinator.layer_split import (  # noqa: F401  (re-exported)
    ROUTER_BYTES,
    attention_params,
    check_split,
    embedding_cost,
    head_cost,
    layer_costs,
    layer_ranges,
    mlp_params,
    parse_pp_layers,
    router_bytes,
    split_layers,
)
from moeserve.experts.placement import check_placement, compact_ranges, expert_placement  # noqa: F401
from moeserve.model.config import ModelConfig
from moeserve.model.fp8 import cdiv, routed_fp8_block

if TYPE_CHECKING:
    from moeserve.experts.moe import ExpertPlacement

MIN_CACHE_TOKENS = 64  # one accelerator-sized cache block: a rank that cannot hold it cannot serve



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
    routed_experts: int = 0  # with FP8 experts: 1 byte per weight plus float32 block scales
    head: int = 0  # final norm and LM head
    dequant_buffer: int = 0  # FP8 experts: the one buffer a layer's local experts are dequantized into

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
    fp8_block: tuple[int, int] | None = None  # routed experts kept float8 with this scale block

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

        return ExpertPlacement.from_ranks([list(ids) for ids in self.expert_ids], self.dims.ep_rank(rank))

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


def expert_bytes(hidden: int, intermediate: int, dtype_bytes: int, fp8_block: tuple[int, int] | None) -> int:
    """One routed expert (or its tp slice): gate, up [I, H] and down [H, I]; in FP8 one byte per weight plus
    a float32 scale per block of each of the three."""
    if fp8_block is None:
        return mlp_params(hidden, intermediate) * dtype_bytes
    bo, bi = fp8_block
    scales = 2 * cdiv(intermediate, bo) * cdiv(hidden, bi) + cdiv(hidden, bo) * cdiv(intermediate, bi)
    return mlp_params(hidden, intermediate) + 4 * scales


def rank_weight_bytes(config: ModelConfig, dims: ParallelDims, layers: range, num_slots: int,
                      dtype_bytes: int, fp8_block: tuple[int, int] | None = None) -> WeightBytes:
    """Weights of one rank of the stage running ``layers`` that holds ``num_slots`` routed experts.

    Attention, dense MLPs and shared experts are split over tp; routed experts over ep (each whole), or,
    when ep == 1, every expert's intermediate dim over tp. Embedding and LM head are split by vocab.
    With ``fp8_block`` the routed experts are float8 and one layer's worth is dequantized into a buffer.
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
        routed_experts=num_moe * num_slots * expert_bytes(h, expert_inter, dtype_bytes, fp8_block),
        head=(h + (0 if head_shares_embedding else vocab_shard)) * dtype_bytes if layers.stop == n else 0,
        dequant_buffer=num_slots * mlp_params(h, expert_inter) * dtype_bytes if fp8_block and num_moe else 0)


def make_plan(config: ModelConfig, dims: ParallelDims, dtype_bytes: int,
              kv_cache_bytes_per_rank: int | None = None, memory_per_rank: int | None = None,
              pp_layers: list[int] | None = None, placement_file: Path | None = None,
              keep_fp8: bool = False) -> ParallelPlan:
    """Lay ``config`` out on one replica of ``dims``; raise InfeasiblePlanError saying why it cannot.

    Without ``pp_layers`` the layers are split by ``split_layers`` over ``layer_costs``. The cache budget
    of a rank is ``kv_cache_bytes_per_rank`` if given, else what ``memory_per_rank`` leaves after weights.
    ``keep_fp8``: count the routed experts of an FP8 config as the model keeps them (``fp8.routed_fp8_block``).
    """
    fp8_block = routed_fp8_block(config, keep_fp8, dims.tp, dims.experts_tensor_parallel)
    check_shapes(config, dims, placement_file is not None)
    if pp_layers is None:
        pp_layers = split_layers(layer_costs(config), dims.pp, embedding_cost(config), head_cost(config))
    check_split(pp_layers, config.num_hidden_layers, dims.pp)
    expert_ids = expert_placement(config.n_routed_experts, dims.ep, placement_file)
    layers = layer_ranges(pp_layers)
    weights = tuple(rank_weight_bytes(config, dims, layers[dims.coord(rank).pp_stage],
                                      len(expert_ids[dims.ep_rank(rank)]), dtype_bytes, fp8_block)
                    for rank in range(dims.ranks_per_replica))
    plan = ParallelPlan(config, dims, dtype_bytes, tuple(pp_layers), tuple(tuple(r) for r in expert_ids),
                        weights, fp8_block=fp8_block)
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
    weights = f"{plan.dtype_bytes}-byte weights"
    if plan.fp8_block is not None:
        buffer = max(w.dequant_buffer for w in plan.rank_weights)
        weights = (f"routed experts FP8 (1 byte + float32 {plan.fp8_block[0]}x{plan.fp8_block[1]} block scales; "
                   f"weights include a {_size(buffer)} dequantization buffer), other weights {plan.dtype_bytes}-byte")
    lines = [f"topology: {dims.describe()}",
             f"model:    {c.num_hidden_layers} layers, {c.n_routed_experts} routed experts "
             f"(top-{c.num_experts_per_tok}), {weights}",
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
