"""The MoE layer on local shapes: router, routed experts owned by this rank, shared experts.

Ownership is computed once (``ExpertPlacement``); routed tokens are grouped by expert with one sort and one
``bincount``, and each active local expert runs one matmul over its tokens. Empty experts are skipped.
Routed pairs are counted per expert in the rank's expert-load counter (``load_counter.py``), which feeds
metrics, the dashboard and the EPLB planner; a bare layer counts in ``tokens_per_expert``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.comm.shard import SINGLE, ShardInfo
from moeserve.experts.ep_dispatch import AllToAllDispatch, check_dispatch, holder_table, pick_owner
from moeserve.experts.gate import GateSpec, route, router_logits
from moeserve.experts.load_counter import ExpertLoadCounter, count_routed
from moeserve.experts.placement import expert_placement
from moeserve.model.config import ModelConfig
from moeserve.model.cpu_linear import PackedLinear, silu_and_mul
from moeserve.model.fp8 import FP8_DTYPE, DequantBuffer, scale_shape
from moeserve.model.layers import MLP

# FP8 experts above this many tokens a step: dequantize + grouped GEMM. Measured on one H200 at V3's shapes
# (benchmarks/bench_moe_kernels.py paths): the fused kernel 11.7 ms a layer at 2048 tokens against 16.7,
# 34.5 at 8192 against 25.6
FP8_FUSED_MAX_TOKENS = 4096


@dataclass(frozen=True)
class ExpertPlacement:
    """Which logical experts this rank holds, in physical-slot order (``phy2log``).

    ``all_ranks``, when known, is the whole placement (every EP rank's slots; ``rank`` is this one). A hot
    expert may then have copies on several ranks: each of a token's pairs with it is served by one copy,
    chosen by token index (``ep_dispatch.pick_owner``, the rule both dispatch paths use), so that the
    all-reduce adds each pair once."""

    num_logical: int
    local_logical_ids: tuple[int, ...]
    rank: int = 0
    all_ranks: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def from_ranks(cls, per_rank: list[list[int]], rank: int) -> ExpertPlacement:
        """Rank ``rank``'s share of a whole placement (logical expert ids per EP rank)."""
        num_logical = 1 + max(e for ids in per_rank for e in ids)
        return cls(num_logical, tuple(per_rank[rank]), rank, tuple(tuple(ids) for ids in per_rank))

    @classmethod
    def all_local(cls, num_experts: int) -> ExpertPlacement:
        return cls(num_experts, tuple(range(num_experts)))

    @classmethod
    def contiguous(cls, num_experts: int, ep_rank: int, ep_size: int) -> ExpertPlacement:
        """Rank ``ep_rank``'s share of the default placement (the one ``moeserve plan`` prints)."""
        return cls.from_ranks(expert_placement(num_experts, ep_size), ep_rank)

    @property
    def num_local(self) -> int:
        return len(self.local_logical_ids)

    def log2local(self) -> torch.Tensor:
        """[num_logical] -> local slot, or ``num_local`` (a sentinel) for experts held elsewhere."""
        table = torch.full((self.num_logical,), self.num_local, dtype=torch.long)
        for slot, log_id in enumerate(self.local_logical_ids):
            table[log_id] = slot
        return table

    @property
    def has_copies(self) -> bool:
        """Whether some logical expert sits on several ranks (known only with the whole placement)."""
        held = [e for ids in self.all_ranks for e in ids]
        return len(held) > len(set(held))

    def holders(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``ep_dispatch.holder_table`` of the whole placement (None when only this rank's share is known)."""
        if not self.all_ranks:
            return None
        return holder_table(torch.tensor(self.all_ranks, dtype=torch.long), self.num_logical)


def gate_spec(config: ModelConfig) -> GateSpec:
    return GateSpec(
        num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
        scoring_func=config.scoring_func, topk_method=config.topk_method, n_group=config.n_group,
        topk_group=config.topk_group, norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=config.routed_scaling_factor)


class MoE(nn.Module):
    log2local: torch.Tensor
    holders: torch.Tensor | None
    num_copies: torch.Tensor | None
    tokens_per_expert: torch.Tensor
    e_score_correction_bias: torch.Tensor | None
    w13_scale_inv: torch.Tensor | None
    w2_scale_inv: torch.Tensor | None

    def __init__(self, config: ModelConfig, placement: ExpertPlacement | None = None,
                 dtype: torch.dtype | None = None, shard: ShardInfo = SINGLE, expert_tp: bool = False,
                 dispatch: str = "allreduce", *, fp8_block: tuple[int, int] | None = None,
                 dequant: DequantBuffer | None = None):
        """``placement``: the routed experts held here (expert parallel). ``expert_tp``: split every routed
        expert's intermediate dim over ``shard`` instead (tensor-parallel experts). Shared experts are always
        tensor-parallel over ``shard``; routed + shared partial sums are reduced once. ``dispatch``:
        "alltoall" sends each rank's token share to the expert owners instead (``ep_dispatch.py``).

        ``fp8_block``: keep the routed experts in float8 with float32 block scales (``w13_scale_inv``
        [E_local, 2, ceil(I/bo), ceil(H/bi)], gate and up apart; ``w2_scale_inv`` [E_local, ceil(H/bo),
        ceil(I/bi)]) and dequantize them into ``dequant`` (shared by the model's layers) at each forward."""
        super().__init__()
        self.spec = gate_spec(config)
        self.shard = shard
        self.expert_tp = expert_tp
        self.placement = placement or ExpertPlacement.all_local(config.n_routed_experts)
        hidden = config.hidden_size
        inter = shard.split(config.moe_intermediate_size, "moe_intermediate_size") if expert_tp \
            else config.moe_intermediate_size
        num_local = self.placement.num_local
        self.gate_weight = nn.Parameter(torch.empty(config.n_routed_experts, hidden, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(config.n_routed_experts, dtype=torch.float32)
                             if config.topk_method == "noaux_tc" else None)
        # [E_local, 2 * I, H] and [E_local, H, I]: gate/up fused, like the dense MLP
        self.compute_dtype = dtype or torch.get_default_dtype()
        self.fp8_block = fp8_block
        self.dequant = dequant or DequantBuffer()
        store = FP8_DTYPE if fp8_block else dtype
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * inter, hidden, dtype=store), requires_grad=not fp8_block)
        self.w2 = nn.Parameter(torch.empty(num_local, hidden, inter, dtype=store), requires_grad=not fp8_block)
        self._init_scales(num_local, inter, hidden)
        self.register_buffer("log2local", self.placement.log2local(), persistent=False)
        # with no expert copied on several ranks, every pair of an expert held here is served here
        table = self.placement.holders() if self.placement.has_copies else None
        self.register_buffer("holders", None if table is None else table[0], persistent=False)
        self.register_buffer("num_copies", None if table is None else table[1], persistent=False)
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts, dtype=torch.long),
                             persistent=False)
        self.shared_experts = (MLP(hidden, config.moe_intermediate_size * config.n_shared_experts, dtype,
                                   shard, reduce=False) if config.n_shared_experts else None)
        self.last_expert_ids: torch.Tensor | None = None  # [T, top_k] of the latest forward
        self.fused = False  # the fused MoE kernel (kernels/fused_moe.py); set by DeepseekModel.use_kernels
        self.fused_router = False  # the router kernel (kernels/router.py); likewise
        # [T] 1 for real tokens, 0 for a CUDA graph's padding rows (so they are not counted); None: all real
        self.count_weights: torch.Tensor | None = None
        self.load_counter: ExpertLoadCounter | None = None  # set by load_counter.attach_counter
        self.layer_id = -1
        # FP8 experts are dequantized into a buffer shared by every layer: packing it would repack each call
        self.linear = PackedLinear(pack=fp8_block is None)
        self.dispatch = check_dispatch(dispatch, expert_tp)
        self.all_to_all = AllToAllDispatch(self.placement, shard) if dispatch == "alltoall" and shard.size > 1 \
            else None

    def _init_scales(self, num_local: int, inter: int, hidden: int) -> None:
        if self.fp8_block is None:
            self.w13_scale_inv = self.w2_scale_inv = None
            return
        shape13 = scale_shape((num_local, 2, inter, hidden), self.fp8_block)
        shape2 = scale_shape((num_local, hidden, inter), self.fp8_block)
        self.w13_scale_inv = nn.Parameter(torch.empty(shape13, dtype=torch.float32), requires_grad=False)
        self.w2_scale_inv = nn.Parameter(torch.empty(shape2, dtype=torch.float32), requires_grad=False)

    @property
    def dequant_numel(self) -> int:
        """Elements of ``dequant`` one forward of this layer uses (0 unless the experts are FP8)."""
        return 0 if self.fp8_block is None else self.w13.numel() + self.w2.numel()

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [E_local, 2I, H], w2 [E_local, H, I]) in the compute dtype. FP8 experts are dequantized
        into the shared buffer: the views stay valid until another layer's call."""
        if self.fp8_block is None:
            return self.w13, self.w2
        assert self.w13_scale_inv is not None and self.w2_scale_inv is not None
        w13, w2 = self.dequant.views([self.w13.shape, self.w2.shape], self.compute_dtype, self.w13.device)
        num_local, two_inter, hidden = self.w13.shape
        halves = (num_local, 2, two_inter // 2, hidden)  # gate and up have their own block grids
        self.dequant.dequantize(w13.view(halves), self.w13.view(halves), self.w13_scale_inv, self.fp8_block)
        self.dequant.dequantize(w2, self.w2, self.w2_scale_inv, self.fp8_block)
        return w13, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]. Only experts held here contribute to the routed part."""
        if self.all_to_all is not None:
            return self.all_to_all.forward(self, x)
        count = self.load_counter.router_target(self.layer_id, x.shape[0], self.count_weights) \
            if self.fused_router and self.load_counter is not None else None
        weights, ids = self.route(x, count)
        self.last_expert_ids = ids
        if count is None:  # else the router kernel counted the pairs as it chose them
            self.count_tokens(ids)
        out = (self.routed_fused if self.fused else self.routed_eager)(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.shard.all_reduce(out)

    def route(self, x: torch.Tensor, count: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (routing weights [T, top_k] float32, logical expert ids [T, top_k]). ``count``
        (the router kernel only): the counter's target, ``ExpertLoadCounter.router_target``."""
        logits = router_logits(x, self.gate_weight)
        if self.fused_router:
            from moeserve.kernels.router import fused_route

            return fused_route(logits, self.spec, self.e_score_correction_bias, count)
        return route(logits, self.spec, self.e_score_correction_bias)

    def count_tokens(self, ids: torch.Tensor) -> None:
        """Count a step's routed pairs (ids [T, top_k]): in the rank's expert-load counter where one is
        attached (the one count serving metrics, the dashboard and EPLB), else in ``tokens_per_expert`` (a
        bare layer). A scatter-add into a fixed buffer, with no host synchronisation."""
        if self.load_counter is not None:
            count_routed(self.load_counter, self.layer_id, ids, weights=self.count_weights)
            return
        ones = torch.ones_like(ids) if self.count_weights is None else \
            self.count_weights[:ids.shape[0], None].expand_as(ids)
        self.tokens_per_expert.index_add_(0, ids.flatten(), ones.flatten())

    def routed_fused(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Same contract as ``routed``, by the fused Triton kernel; FP8 experts are read as they are stored,
        except in steps of more than ``FP8_FUSED_MAX_TOKENS`` tokens, where dequantizing every local expert
        once and two bf16 grouped GEMMs on tensor cores cost less."""
        from moeserve.kernels.fused_moe import fused_moe

        if self.fp8_block is not None and x.shape[0] > FP8_FUSED_MAX_TOKENS and self.use_grouped_mm(x):
            return self.routed_grouped(x, weights, ids)

        return fused_moe(x, self.w13, self.w2, weights, self.local_slots(ids), self.placement.num_local,
                         self.w13_scale_inv, self.w2_scale_inv, self.fp8_block or (128, 128))

    def routed_eager(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``routed``'s contract by the eager ops: grouped GEMMs on GPUs, a loop of matmuls elsewhere."""
        return (self.routed_grouped if self.use_grouped_mm(x) else self.routed)(x, weights, ids)

    @staticmethod
    def use_grouped_mm(x: torch.Tensor) -> bool:
        # NOTE: on GPUs one grouped GEMM replaces the loop over experts and its host sync; on CPU the loop of
        # plain matmuls is as fast and is what the float32 reference tests pin down.
        return x.is_cuda and hasattr(torch, "_grouped_mm")

    def routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Same contract as ``routed``, with two grouped GEMMs and no host synchronisation."""
        top_k = ids.shape[1]
        num_local = self.placement.num_local
        local = self.local_slots(ids)
        order = torch.argsort(local, stable=True)
        counts = torch.zeros(num_local + 1, dtype=torch.long, device=local.device).index_add_(
            0, local, torch.ones_like(local))  # bincount would synchronise with the host
        offsets = torch.cumsum(counts[:num_local], 0).to(torch.int32)
        token_ids = order // top_k
        w13, w2 = self.expert_weights()
        h = torch._grouped_mm(x[token_ids], w13.transpose(1, 2), offs=offsets)  # [N, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)  # [N, H]
        # rows past the last offset (experts held elsewhere) are left uninitialised by the kernel
        held = (local[order] < num_local).unsqueeze(-1)
        y = torch.where(held, y * weights.flatten()[order].unsqueeze(-1).to(y.dtype), torch.zeros_like(y))
        # NOTE: each (token, k) row goes back to its place and a token's top_k rows are summed in a fixed
        # order; index_add_ on GPUs sums them by atomics, in an order (and so a bf16 result) that varies by run
        pairs = torch.empty_like(y).index_copy_(0, order, y)  # [T * top_k, H]
        return pairs.view(-1, top_k, y.shape[-1]).sum(1).to(x.dtype)

    def local_slots(self, ids: torch.Tensor) -> torch.Tensor:
        """[T, top_k] logical ids -> [T * top_k] local slot, or ``num_local`` where another rank serves the
        pair (it holds the expert, or holds the copy that this token's index picks)."""
        local = self.log2local[ids.flatten()]
        if self.holders is not None and self.num_copies is not None:
            owner = pick_owner(ids, 0, self.holders, self.num_copies).flatten()
            local = torch.where(owner == self.placement.rank, local, self.placement.num_local)
        return local

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H], weights/ids: [T, top_k] -> sum over the local experts of weight * expert(x).

        Tokens are gathered once in expert order; each active expert runs two matmuls on its contiguous
        slice, and the weighting and the scatter back happen once for all experts.
        """
        top_k = ids.shape[1]
        local = self.local_slots(ids)  # [T * top_k], sentinel num_local for pairs served elsewhere
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=self.placement.num_local + 1).tolist()
        order = order[:len(order) - counts[-1]]  # drop the (token, expert) pairs held elsewhere
        out = torch.zeros_like(x)
        if not len(order):
            return out
        token_ids = order // top_k
        xs = x[token_ids]  # [N, H] in expert order
        pair_weights = weights.flatten()[order].unsqueeze(-1).to(x.dtype)  # [N, 1]
        w13, w2 = self.expert_weights()
        start = 0
        # NOTE: each expert's rows are weighted and added in place as they come: no [N, H] concatenation and
        # product. index_add_ adds rows in index order, so the sums (and their rounding) are those of one
        # index_add_ over all N rows in expert order.
        for slot, count in enumerate(counts[:-1]):
            if count == 0:
                continue
            rows = slice(start, start + count)
            h = self.linear(xs[rows], w13[slot], ("w13", slot))
            y = self.linear(silu_and_mul(h), w2[slot], ("w2", slot))
            out.index_add_(0, token_ids[rows], y.mul_(pair_weights[rows]).to(out.dtype))
            start += count
        return out
