"""One check per kind of fused kernel: the kernel and its eager reference on the same inputs.

The inputs are those that reached the first module of each kind during an eager step of the start-up check
(``capture_inputs``), so that the kernels are judged on the model's own activations and shapes, one kind at
a time, with every other kind eager. Tolerances are per kind: an RMSNorm or a rotation rounds once, an
attention or an expert GEMM sums thousands of products.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moeserve.experts.gate import router_logits
from moeserve.experts.moe import MoE
from moeserve.model.layers import MLP, RMSNorm, RotaryEmbedding
from moeserve.model.mla import MLA

# kind -> (module class, the flag that turns its kernel on)
KINDS: dict[str, tuple[type[nn.Module], str]] = {
    "rmsnorm": (RMSNorm, "fused"), "rope": (RotaryEmbedding, "fused"), "mla": (MLA, "fused"),
    "router": (MoE, "fused_router"), "moe": (MoE, "fused"), "shared": (MoE, "fused_shared"), "mlp": (MLP, "fused"),
}
# kinds checked on another kind's captured inputs (the MoE layer's), not hooked themselves
_ON_MOE_INPUT = ("router", "shared")
# relative L2 distance allowed between a kernel and its eager reference, by kind and dtype
_ROUNDED_ONCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
_SUMMED = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
TOLERANCE = {"rmsnorm": _ROUNDED_ONCE, "rope": _ROUNDED_ONCE, "mla": _SUMMED, "moe": _SUMMED, "shared": _SUMMED,
             "mlp": _SUMMED}
# the router's scores are float32 on both paths: the picked experts' scores may differ by rounding only
ROUTER_TOLERANCE = 1e-4
# tokens the expert check runs with besides the captured ones: enough pairs for the sorted (GEMM) path
EXPERT_CHECK_TOKENS = 80


@dataclass(frozen=True)
class OpResult:
    kind: str
    error: float  # relative L2 distance to the eager reference (the router: of the picked experts' scores)
    tolerance: float
    raised: str = ""  # the exception, where the kernel failed to build or run

    @property
    def ok(self) -> bool:
        return not self.raised and self.error <= self.tolerance

    def describe(self) -> str:
        if self.raised:
            return f"the {self.kind} kernel raised {self.raised}"
        verdict = "ok" if self.ok else "FAILED"
        return f"the {self.kind} kernel differs from its eager reference by {self.error:.2e} " \
               f"(tolerance {self.tolerance:.0e}): {verdict}"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def present_kinds(model: nn.Module) -> set[str]:
    classes = {type(m) for m in model.modules()}
    return {kind for kind, (cls, _) in KINDS.items() if cls in classes}


def set_kinds(model: nn.Module, on: set[str]) -> None:
    """Turn the kernels of the kinds in ``on`` on and every other kind's off."""
    for module in model.modules():
        for kind, (cls, flag) in KINDS.items():
            if isinstance(module, cls):
                setattr(module, flag, kind in on)


@contextlib.contextmanager
def capture_inputs(model: nn.Module) -> Iterator[dict[str, list[tuple[nn.Module, tuple]]]]:
    """While open, keep (module, inputs) of the first call of each kind's modules in every step (a step
    starts when the model's first layer is entered). -> {kind: [(module, args), ...]}"""
    captured: dict[str, list[tuple[nn.Module, tuple]]] = {}
    seen: set[str] = set()  # kinds captured in the current step
    first_layer = next(m for m in model.modules() if isinstance(m, MLA))

    def keep(kind: str, module: nn.Module, args: tuple) -> None:
        if module is first_layer and kind == "mla":
            seen.clear()
        if kind not in seen:
            seen.add(kind)
            captured.setdefault(kind, []).append((module, tuple(
                a.clone() if isinstance(a, torch.Tensor) and a.numel() < 1 << 24 else a for a in args)))

    handles = []
    for module in model.modules():
        for kind, (cls, _) in KINDS.items():
            if isinstance(module, cls) and kind not in _ON_MOE_INPUT:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, kind=kind: keep(kind, m, args)))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
    if "moe" in captured:
        for kind in _ON_MOE_INPUT:
            captured[kind] = captured["moe"]


@torch.inference_mode()
def check_kind(model: nn.Module, kind: str, calls: list[tuple[nn.Module, tuple]]) -> OpResult:
    """Run ``kind``'s kernel and its reference on each captured call; the worst error decides."""
    set_kinds(model, set())
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    if kind == "router":
        return OpResult(kind, max(_router_error(m, args[0]) for m, args in calls), ROUTER_TOLERANCE)
    check = {"rmsnorm": _norm_pair, "rope": _call_pair, "mla": _call_pair, "moe": _experts_pair,
             "shared": _experts_pair, "mlp": _call_pair}[kind]
    error = 0.0
    for module, args in calls:
        for fast, ref in check(module, KINDS[kind][1], args):
            error = max(error, relative_error(fast, ref))
    tolerance = TOLERANCE[kind].get(dtype, _SUMMED[torch.bfloat16])
    return OpResult(kind, error, tolerance)


def _both(module: nn.Module, flag: str, fn) -> tuple:
    setattr(module, flag, False)
    ref = fn()
    setattr(module, flag, True)
    try:
        return fn(), ref
    finally:
        setattr(module, flag, False)


def _call_pair(module: nn.Module, flag: str, args: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The module's forward as the model called it. MLA writes the step's rows to its cache first: the same
    rows on both paths (its norm and rotation are eager here), so the second call reads what the first did."""
    return [_both(module, flag, lambda: module(*args))]


def _norm_pair(module: nn.Module, flag: str, args: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = args[0]
    if x.dim() != 2:
        return [_both(module, flag, lambda: module(x))]
    x = x.contiguous()
    residual = x.roll(1, 0).contiguous()
    fast, ref = _both(module, flag, lambda: torch.cat(module.add_norm(x, residual), -1))  # type: ignore[operator]
    return [_both(module, flag, lambda: module(x)), (fast, ref)]


def _experts_pair(moe: nn.Module, flag: str, args: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The routed experts on the eager router's choice, at the captured size and at a size that takes the
    sorted (tensor-core) path: alone ("moe"), or with the shared experts added in the kernel ("shared", where
    ``MoE.shared_in_kernel`` takes them at that size)."""
    assert isinstance(moe, MoE)
    x = args[0]
    big = x.repeat(-(-EXPERT_CHECK_TOKENS // max(x.shape[0], 1)), 1)[:EXPERT_CHECK_TOKENS]
    pairs = []
    for rows in (x, big.contiguous()):
        weights, ids = moe.route(rows)
        if flag == "fused":
            pairs.append((moe.routed_fused(rows, weights, ids), moe.routed_eager(rows, weights, ids)))
            continue
        setattr(moe, flag, True)  # shared_in_kernel asks for it
        try:
            with_shared = moe.routed_and_shared_fused(rows, weights, ids)
        finally:
            setattr(moe, flag, False)
        if with_shared is not None:
            pairs.append((with_shared, moe.routed_and_shared_eager(rows, weights, ids)))
    return pairs


def _router_error(moe: nn.Module, x: torch.Tensor) -> float:
    """How much worse the kernel's picks are than the eager ones, by the eager selection score: a near-tie
    broken the other way costs a rounding error, a wrong pick the gap to the right one. Where both pick
    the same experts, their weights must match too. Where the kernel also looks up each pair's local slot,
    a slot that is not the expert map's for the kernel's own pick fails the check outright."""
    assert isinstance(moe, MoE)
    slot_map = moe.expert_map.direct_slots() if moe.dispatcher.routes_all else None
    fast, ref = _both(moe, "fused_router", lambda: moe.route_to_slots(x, None, slot_map))
    (weights, ids, slots), (ref_weights, ref_ids, _) = fast, ref
    if slots is not None and not torch.equal(slots, moe.local_slots(ids)):
        return float("inf")  # the kernel's slot lookup disagrees with the expert map's for its own picks
    logits = router_logits(x, moe.gate_weight)
    scores = logits.softmax(-1) if moe.spec.scoring_func == "softmax" else logits.sigmoid()
    choice = scores if moe.e_score_correction_bias is None else scores + moe.e_score_correction_bias
    picked = choice.gather(1, ids).sort(1).values
    ref_picked = choice.gather(1, ref_ids).sort(1).values
    gap = float((picked - ref_picked).abs().max()) / max(float(ref_picked.abs().max()), 1e-30) if ids.numel() else 0.0
    order, ref_order = ids.sort(1), ref_ids.sort(1)
    same = (order.values == ref_order.values).all(1)
    if bool(same.any()):
        gap = max(gap, relative_error(weights.gather(1, order.indices)[same],
                                      ref_weights.gather(1, ref_order.indices)[same]))
    return max(gap, _norm_logits_error(moe, x)) if x.shape[0] and x.dim() == 2 else gap


def _norm_logits_error(moe: MoE, x: torch.Tensor) -> float:
    """A one-token step's residual add, norm and router logits in one launch (``MoE.norm_and_logits``) against
    the norm kernel and the router's one-token logits kernel run one after the other (each judged against its
    eager reference by its own kind): the same sum, the same rows up to the order of a float32 sum."""
    from moeserve.kernels.rmsnorm import rms_norm
    from moeserve.kernels.router import norm_router_logits, router_logits_few

    h = x[:1].contiguous()
    residual = h.roll(1, -1).contiguous()
    weight = torch.linspace(0.5, 1.5, h.shape[1], dtype=h.dtype, device=h.device)
    normed, total, logits = norm_router_logits(h, residual, weight, 1e-6, moe.gate_weight)
    ref_normed, ref_total = rms_norm(h, weight, 1e-6, residual)
    if not torch.equal(total, ref_total):
        return float("inf")
    return max(relative_error(normed, ref_normed),
               relative_error(logits, router_logits_few(ref_normed, moe.gate_weight)))
