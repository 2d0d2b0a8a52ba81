"""The MoE layer on local shapes: router, routed experts held by this rank, shared experts.

``MoE.forward`` reads the same whatever the dispatch: route this rank's tokens, count the routed pairs,
dispatch them to the experts that serve them (``ep_dispatch.py``: all-reduce or all-to-all), run the experts
(``expert_compute.py``), combine. Which rank serves a pair is the layer's ``ExpertMap`` (``expert_map.py``),
the one owner of its placement. Routed pairs are counted per expert in the rank's expert-load counter
(``load_counter.py``), which feeds metrics, the dashboard and the EPLB planner; a bare layer counts in
``tokens_per_expert``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moeserve.comm.shard import SINGLE, ShardInfo
from moeserve.experts.ep_dispatch import AllToAllDispatch, check_dispatch, make_dispatch
from moeserve.experts.expert_compute import FP8_FUSED_MAX_TOKENS, RoutedExperts  # noqa: F401 - re-exported
from moeserve.experts.expert_map import ExpertMap, ExpertPlacement
from moeserve.experts.gate import GateSpec, exact_copy, route, router_logits
from moeserve.experts.load_counter import ExpertLoadCounter, count_routed
from moeserve.model.config import ModelConfig
from moeserve.model.fp8 import DequantBuffer
from moeserve.model.layers import MLP, RMSNorm

if TYPE_CHECKING:
    from moeserve.kernels.moe_gemv import SharedWeights

__all__ = ["ExpertPlacement", "MoE", "gate_spec"]

# Steps of up to this many tokens add the shared experts in the routed kernel (MoE.shared_in_kernel). Each
# piece is a pair of every token, so the shared weights are read once per token (from L2 after the first):
# at V2-Lite's shapes on one H200 (bench_moe_kernels.py shared, a layer) 0.044 against 0.057 ms apart at 1
# token, 0.117 against 0.124 at 4, 0.206 against 0.193 at 8
SHARED_IN_KERNEL_MAX_TOKENS = 4
# Up to this many tokens the router's logits come from the float32 GEMM even where the weight has a bf16-exact
# copy: at one token on an H100 the cast and cuBLAS's float32 dot took 0.125 ms a V2-Lite step against 0.189 ms
# for the bf16 GEMM with float32 output (profile_decode.py, 2026-12-06); from 64 tokens the bf16 GEMM wins. With
# the router kernel on, those steps take the float32 logits from one launch (``kernels.router.router_logits_few``)
ROUTER_FLOAT32_MAX_TOKENS = 1


def gate_spec(config: ModelConfig) -> GateSpec:
    return GateSpec(
        num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
        scoring_func=config.scoring_func, topk_method=config.topk_method, n_group=config.n_group,
        topk_group=config.topk_group, norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=config.routed_scaling_factor)


class MoE(RoutedExperts):
    tokens_per_expert: torch.Tensor
    e_score_correction_bias: torch.Tensor | None

    def __init__(self, config: ModelConfig, placement: ExpertPlacement | None = None,
                 dtype: torch.dtype | None = None, shard: ShardInfo = SINGLE, expert_tp: bool = False,
                 dispatch: str = "allreduce", *, fp8_block: tuple[int, int] | None = None,
                 dequant: DequantBuffer | None = None):
        """``placement``: the routed experts held here (expert parallel). ``expert_tp``: split every routed
        expert's intermediate dim over ``shard`` instead (tensor-parallel experts). Shared experts are always
        tensor-parallel over ``shard``; routed + shared partial sums are reduced once. ``dispatch``:
        "alltoall" sends each rank's token share to the expert owners instead (``ep_dispatch.py``).
        ``fp8_block`` / ``dequant``: float8 experts (``RoutedExperts``)."""
        super().__init__()
        self.spec = gate_spec(config)
        self.shard = shard
        self.expert_tp = expert_tp
        self.expert_map = ExpertMap(placement or ExpertPlacement.all_local(config.n_routed_experts))
        hidden = config.hidden_size
        inter = shard.split(config.moe_intermediate_size, "moe_intermediate_size") if expert_tp \
            else config.moe_intermediate_size
        self.gate_weight = nn.Parameter(torch.empty(config.n_routed_experts, hidden, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(config.n_routed_experts, dtype=torch.float32)
                             if config.topk_method == "noaux_tc" else None)
        self._init_experts(self.expert_map.num_local, inter, hidden, dtype, fp8_block, dequant)
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts, dtype=torch.long),
                             persistent=False)
        self.shared_experts = (MLP(hidden, config.moe_intermediate_size * config.n_shared_experts, dtype,
                                   shard, reduce=False) if config.n_shared_experts else None)
        self.last_expert_ids: torch.Tensor | None = None  # [T, top_k] this rank routed in the latest forward
        self.fused_router = False  # the router kernel (kernels/router.py); set by DeepseekModel.use_kernels
        self.fused_shared = False  # the shared experts in the expert kernels (``shared_in_kernel``); likewise
        # [T] 1 for real tokens, 0 for a CUDA graph's padding rows (so they are not counted); None: all real
        self.count_weights: torch.Tensor | None = None
        self.load_counter: ExpertLoadCounter | None = None  # set by load_counter.attach_counter
        self.layer_id = -1
        self.dispatch = check_dispatch(dispatch, expert_tp)
        self.dispatcher = make_dispatch(dispatch, self.expert_map, shard)

    @property
    def placement(self) -> ExpertPlacement:
        return self.expert_map.placement

    @property
    def all_to_all(self) -> AllToAllDispatch | None:
        return self.dispatcher if isinstance(self.dispatcher, AllToAllDispatch) else None

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, hidden], the same on every rank of the group -> [T, hidden], the same on every rank.
        ``logits``: the router's float32 logits of x where they are made already (``norm_and_logits``)."""
        if x.shape[0] == 0:  # the same on every rank: nothing to route or exchange
            return x.new_zeros(x.shape)
        first, n = self.dispatcher.share(x.shape[0])  # the tokens this rank routes
        tokens = x[first:first + n]
        count = self.load_counter.router_target(self.layer_id, x.shape[0], self.count_weights) \
            if self.fused_router and self.load_counter is not None and self.dispatcher.routes_all else None
        # the router kernel also looks up each pair's local slot where that is all the dispatch would do
        slot_map = self.expert_map.direct_slots() if self.fused_router and self.dispatcher.routes_all else None
        weights, ids, slots = self.route_to_slots(tokens, count, slot_map, logits)  # 1. route
        self.last_expert_ids = ids
        if count is None:  # else the router kernel counted the pairs as it chose them
            self.count_tokens(ids, first)
        rows = self.dispatcher.dispatch(tokens, weights, ids, first, slots)      # 2. dispatch
        if rows.peer_counts is not None:  # every rank's share: the layer's whole step
            self.tokens_per_expert += rows.peer_counts.to(self.tokens_per_expert)
        in_kernel = self.shared_in_kernel(rows.x, rows.slots.numel()) if self.fused else None
        y = self.run_experts(rows.x, rows.weights, rows.slots, in_kernel)       # 3. experts
        routed = self.dispatcher.combine(y, rows)                               # 4. combine
        shared = self.shared_experts(x) if self.shared_experts is not None and in_kernel is None else None
        return self.dispatcher.finish(x, routed, first, shared)

    def shared_in_kernel(self, x: torch.Tensor, num_pairs: int) -> SharedWeights | None:
        """The shared experts' weights where the fused kernel would add them to the routed experts' (as more
        pairs: pieces of the shared MLP as wide as a routed expert, every token a pair of each): bf16 experts,
        rows that are this step's tokens (the all-reduce dispatch), a shared width that cuts into routed-wide
        pieces, and a step of at most ``SHARED_IN_KERNEL_MAX_TOKENS`` tokens on the split-K path
        (``num_pairs`` routed pairs; each pair reads its weights there). One launch then reads the shared
        weights at the routed experts' bandwidth instead of two small GEMMs, an activation and an add (V2-Lite's
        shared MLP is two routed experts wide). On the sorted path the shared experts stay apart. The start-up
        check judges this apart from the routed experts (its kind "shared", flag ``fused_shared``). None: the
        shared MLP runs on its own."""
        mlp = self.shared_experts
        if not (self.fused_shared and mlp is not None and self.fp8_block is None and self.dispatcher.routes_all
                and mlp.gate_up_proj.dtype == x.dtype):
            return None
        from moeserve.kernels.fused_moe import takes_gemv_path
        from moeserve.kernels.moe_gemv import SharedWeights

        if not (takes_gemv_path(num_pairs, False) and x.shape[0] <= SHARED_IN_KERNEL_MAX_TOKENS):
            return None
        weights = SharedWeights(mlp.gate_up_proj, mlp.down_proj)
        return weights if weights.pieces(self.w2.shape[-1]) else None

    def route(self, x: torch.Tensor, count: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (routing weights [T, top_k] float32, logical expert ids [T, top_k]). ``count``
        (the router kernel only): the counter's target, ``ExpertLoadCounter.router_target``."""
        weights, ids, _ = self.route_to_slots(x, count)
        return weights, ids

    def norm_and_logits(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For a one-token step with the norm and router kernels on and every token routed here: ``norm``'s
        residual add and norm of this layer's input and the router's float32 logits of its output in one launch
        (``kernels.router.norm_router_logits``) -> (normalised x, x + residual, logits). Else None."""
        tokens = x.shape[0]
        if not (self.fused_router and norm.fused and 0 < tokens <= ROUTER_FLOAT32_MAX_TOKENS
                and self.dispatcher.share(tokens) == (0, tokens) and x.is_contiguous() and residual.is_contiguous()
                and residual.shape == x.shape and residual.dtype == x.dtype):
            return None
        from moeserve.kernels.router import norm_router_logits

        return norm_router_logits(x, residual, norm.weight, norm.eps, self.gate_weight)

    def route_to_slots(self, x: torch.Tensor, count: tuple | None = None, slot_map: torch.Tensor | None = None,
                       logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``route``, and with the router kernel and a ``slot_map`` (``ExpertMap.direct_slots``) each pair's
        local slot [T * top_k] (else None). ``logits``: x's router logits, made already (the router kernel on)."""
        if x.shape[0] == 0:  # a share of no tokens (fewer tokens than ranks): the group view takes no rows
            top_k = self.spec.top_k
            return x.new_zeros((0, top_k), dtype=torch.float32), x.new_zeros((0, top_k), dtype=torch.long), None
        # made at every call, one token too (unused there): the copy must exist before a graph is captured
        weight_in = self._gate_weight_in(x.dtype) if self.fused_router else None
        if self.fused_router:
            from moeserve.kernels.router import fused_route, router_logits_few

            # up to ROUTER_FLOAT32_MAX_TOKENS: the float32 logits in one launch (no cast of x, no cuBLAS dot)
            if logits is None:
                logits = router_logits_few(x, self.gate_weight) if x.shape[0] <= ROUTER_FLOAT32_MAX_TOKENS else \
                    router_logits(x, self.gate_weight, weight_in)
            return fused_route(logits, self.spec, self.e_score_correction_bias, count, slot_map)
        logits = router_logits(x, self.gate_weight, None)
        return (*route(logits, self.spec, self.e_score_correction_bias), None)

    def _gate_weight_in(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The router weight in the activations' dtype where it holds the same values and the device multiplies
        them into float32 (``gate.exact_copy``); made once per weight version (the first call waits for the
        device: the start-up check's eager runs make it before any graph is captured)."""
        if dtype == torch.float32:
            return None
        key = (self.gate_weight.data_ptr(), self.gate_weight._version, dtype)
        if getattr(self, "_gate_in_key", None) != key:
            copy, before = exact_copy(self.gate_weight, dtype), getattr(self, "_gate_in", None)
            if copy is not None and before is not None and (before.shape, before.dtype) == (copy.shape, copy.dtype):
                before.copy_(copy)  # in place: a CUDA graph captured with the old copy reads the new values
            else:
                self._gate_in = copy
            self._gate_in_key = key
        return self._gate_in

    def count_tokens(self, ids: torch.Tensor, first_token: int = 0) -> None:
        """Count the routed pairs of tokens ``first_token ..`` (ids [T, top_k]): in the rank's expert-load
        counter where one is attached (the one count serving metrics, the dashboard and EPLB), else in
        ``tokens_per_expert`` (a bare layer; the all-to-all path adds every rank's counts at dispatch). A
        scatter-add into a fixed buffer, with no host synchronisation."""
        weights = self.count_weights
        if self.load_counter is not None:
            if self.dispatcher.routes_all:  # the counter takes this rank's share
                count_routed(self.load_counter, self.layer_id, ids, weights=weights)
            else:
                share = None if weights is None else weights[first_token:first_token + ids.shape[0]]
                count_routed(self.load_counter, self.layer_id, ids, first_token, share)
            return
        if not self.dispatcher.routes_all:
            return
        ones = torch.ones_like(ids) if weights is None else weights[:ids.shape[0], None].expand_as(ids)
        self.tokens_per_expert.index_add_(0, ids.flatten(), ones.flatten())

    def local_slots(self, ids: torch.Tensor) -> torch.Tensor:
        """[T, top_k] logical ids of a whole step -> [T * top_k] local slot / ``num_local`` (``ExpertMap``)."""
        return self.expert_map.local_slots(ids)

    # The routed experts on a whole step's routing (ids [T, top_k] logical): the reference paths tests,
    # checks and benchmarks compare
    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H], weights/ids: [T, top_k] -> sum over the pairs served here of weight * expert(x)."""
        return self.experts_loop(x, weights, self.local_slots(ids))

    def routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.experts_grouped(x, weights, self.local_slots(ids))

    def routed_eager(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.experts_eager(x, weights, self.local_slots(ids))

    def routed_fused(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.experts_fused(x, weights, self.local_slots(ids))

    def routed_and_shared_fused(self, x: torch.Tensor, weights: torch.Tensor,
                                ids: torch.Tensor) -> torch.Tensor | None:
        """Routed plus shared experts in the fused kernel, where it adds the shared ones (else None)."""
        slots = self.local_slots(ids)
        shared = self.shared_in_kernel(x, slots.numel())
        return None if shared is None else self.experts_fused(x, weights, slots, shared)

    def routed_and_shared_eager(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        assert self.shared_experts is not None
        return self.routed_eager(x, weights, ids) + self.shared_experts(x)
