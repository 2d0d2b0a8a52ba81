"""The start-up check's judgement of the kernels (``moeserve/stages/op_checks.py``): a wrong kernel of one
kind is turned off alone, a near-tie is no fault, and what the check turns on (run by ``tests/test_kernels.py``
with the other kernel cases: on a GPU, or under Triton's interpreter)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from kernel_cases import DEVICE
from kernel_cases_engine import _engine, _run

from moeserve.kernels import triton_available
from moeserve.model.synthetic import tiny_config

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install triton)")


def test_a_wrong_kernel_turns_the_fast_path_off(tmp_path, monkeypatch):
    """The start-up check: a kernel that computes the wrong thing (here the norm, doubled) is caught and
    turned off alone, and the engine's tokens are the eager tokens."""
    import moeserve.kernels.rmsnorm as rmsnorm
    from moeserve.coordinator.sampling import SamplingParams

    right = rmsnorm.rms_norm

    def wrong(x, weight, eps, residual=None):
        out, total = right(x, weight, eps, residual)
        return out * 2, total

    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    prompts = [[3, 4, 5, 6, 7, 8]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    monkeypatch.setattr(rmsnorm, "rms_norm", wrong)
    engine = _engine(tmp_path, False, "float32")
    error = engine.executor.runner.fast_path_error
    assert error is not None and "rmsnorm kernel differs" in error
    model = engine.executor.runner.model
    assert not model.norm.fused and all(m.fused for m in model.moe_layers().values())  # the norm alone is off
    assert (engine.executor.runner.graphs is not None) == (DEVICE.type == "cuda")  # graphs of the kernels that passed
    tokens, _ = _run(engine, prompts, params)
    monkeypatch.setattr(rmsnorm, "rms_norm", right)
    assert tokens == _run(_engine(tmp_path, True, "float32"), prompts, params)[0]


def test_the_mlp_activation_kernel_is_checked_and_on(tmp_path):
    """The SwiGLU kernel is a kind of its own in the start-up check: on after it passes, in the dense and the
    shared MLPs alike; off with every other kind when the model runs eagerly."""
    from moeserve.model.layers import MLP
    from moeserve.stages.op_checks import present_kinds

    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    engine = _engine(tmp_path, False, "float32")
    model = engine.executor.runner.model
    assert engine.executor.runner.fast_path_error is None and "mlp" in present_kinds(model)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert mlps and all(m.fused for m in mlps)
    assert not any(m.fused for m in _engine(tmp_path, True, "float32").executor.runner.model.modules()
                   if isinstance(m, MLP))


def _check_engine(tmp_path, dtype="float32"):
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine

    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    return Engine(EngineConfig(model=str(tmp_path), device=DEVICE.type, dtype=dtype, load_format="dummy",
                               skip_tokenizer_init=True, block_size=16, kv_cache_memory=8 << 20, max_num_seqs=8,
                               max_num_batched_tokens=64))


def test_a_router_near_tie_is_no_fault(tmp_path, monkeypatch):
    """Experts with equal scores (every gate row made the same): a router kernel that breaks the ties the
    other way picks other experts than the eager router, and the check still passes it."""
    import moeserve.kernels.router as router
    from moeserve.experts.gate import router_logits
    from moeserve.stages.op_checks import capture_inputs, check_kind
    from moeserve.stages.selfcheck import CheckPlans

    right = router.fused_route

    def ties_high(logits, spec, bias=None, count=None, slot_map=None):  # among equal scores, the highest index
        weights, ids, _ = right(logits.flip(-1), spec, None if bias is None else bias.flip(-1))
        ids = logits.shape[-1] - 1 - ids
        return weights, ids, None if slot_map is None else slot_map[ids.flatten()]

    engine = _check_engine(tmp_path)
    runner, model = engine.executor.runner, engine.executor.runner.model
    for moe in model.moe_layers().values():
        with torch.no_grad():
            moe.gate_weight[:] = moe.gate_weight[0]  # every expert ties with every other
            if moe.e_score_correction_bias is not None:
                moe.e_score_correction_bias.fill_(0.1)
    model.use_kernels(False)
    with capture_inputs(model) as inputs:
        CheckPlans(runner, runner.num_blocks).run(runner)
    monkeypatch.setattr(router, "fused_route", ties_high)
    moe, (x,) = inputs["router"][0]
    with torch.inference_mode():
        picked = ties_high(router_logits(x, moe.gate_weight), moe.spec, moe.e_score_correction_bias)[1]
        eager = moe.route(x)[1]
    assert not torch.equal(picked.sort(1).values, eager.sort(1).values)  # the ties were broken differently
    result = check_kind(model, "router", inputs["router"])
    assert result.ok, result.describe()


def test_a_wrong_router_is_caught_alone(tmp_path, monkeypatch):
    """A router that picks the wrong experts is turned off; the other kernels stay on."""
    import moeserve.kernels.router as router

    right = router.fused_route

    def worst(logits, spec, bias=None, count=None, slot_map=None):  # the lowest-scoring experts
        return right(-logits, spec, None if bias is None else -bias, count, slot_map)

    monkeypatch.setattr(router, "fused_route", worst)
    engine = _check_engine(tmp_path)
    model = engine.executor.runner.model
    moe = next(iter(model.moe_layers().values()))
    assert not moe.fused_router and moe.fused and model.norm.fused
    assert "router kernel differs" in (engine.executor.runner.fast_path_error or "")


def test_a_router_with_wrong_slots_is_caught(tmp_path, monkeypatch):
    """A router kernel that picks the right experts but looks up the wrong local slots is turned off: the
    check compares its slots with the expert map's, not only its picks."""
    import moeserve.kernels.router as router

    right = router.fused_route

    def shifted(logits, spec, bias=None, count=None, slot_map=None):  # each pair's slot one expert over
        weights, ids, slots = right(logits, spec, bias, count, slot_map)
        return weights, ids, None if slots is None else (slots + 1) % slot_map.numel()

    monkeypatch.setattr(router, "fused_route", shifted)
    engine = _check_engine(tmp_path)
    model = engine.executor.runner.model
    moe = next(iter(model.moe_layers().values()))
    assert moe.expert_map.direct_slots() is not None  # one process: the router kernel looks the slots up
    assert not moe.fused_router and moe.fused and model.norm.fused
    assert "router kernel differs" in (engine.executor.runner.fast_path_error or "")


def test_a_wrong_shared_sum_turns_off_only_the_shared_experts_in_the_kernel(tmp_path, monkeypatch):
    """Kernels that add the shared experts wrongly (the routed experts alone right) are judged apart: the shared
    MLP runs on its own again and the routed experts' kernels stay on."""
    import moeserve.kernels.fused_moe as fused_moe

    right = fused_moe.fused_moe

    def shared_off_by_half(*args, **kwargs):
        out = right(*args, **kwargs)
        shared = inspect.signature(right).bind(*args, **kwargs).arguments.get("shared")
        return out if shared is None else out + 0.5

    monkeypatch.setattr(fused_moe, "fused_moe", shared_off_by_half)
    engine = _check_engine(tmp_path)
    model = engine.executor.runner.model
    moe = next(iter(model.moe_layers().values()))
    assert moe.shared_experts is not None
    assert moe.fused and moe.fused_router and not moe.fused_shared
    assert "shared kernel differs" in (engine.executor.runner.fast_path_error or "")
