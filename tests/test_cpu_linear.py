"""Packed oneDNN linear layers on CPU (bf16): the same numbers as F.linear, and repacked when a weight changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeserve.model.cpu_linear import AVAILABLE, PackedLinear

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="no oneDNN bf16 linear kernels here (this torch lacks them, or this CPU: they need AVX-512 or AVX-NE-CONVERT)")


def test_equals_f_linear_and_follows_weight_changes() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    layer = PackedLinear()
    for rows in (1, 7, 64):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(layer(x, w, "w"), F.linear(x, w))
    x3 = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x3, w, "w"), F.linear(x3, w))
    with torch.no_grad():
        w.mul_(2)  # an in-place write (a weight reload) must be seen
    assert torch.equal(layer(x3, w, "w"), F.linear(x3, w))
    other = torch.randn(96, 64, dtype=torch.bfloat16)  # another tensor under the same name
    assert torch.equal(layer(x3, other, "w"), F.linear(x3, other))
    x32 = torch.randn(3, 64)
    assert torch.equal(layer(x32, w.float(), "w32"), F.linear(x32, w.float()))  # fp32 is not packed
    assert "w32" not in layer._packs


def test_whole_bf16_engine_unchanged(ckpt_factory, monkeypatch) -> None:
    """A bf16 engine (MLA, dense MLP, experts, LM head all packed) gives F.linear's tokens and logprobs."""
    from moeserve.coordinator.config import EngineConfig
    from moeserve.coordinator.engine import Engine
    from moeserve.coordinator.sampling import SamplingParams

    ckpt = ckpt_factory("v3_noaux_norm")
    prompts = [[5, 9, 30, 7], [11, 3], list(range(40, 70))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)

    def run() -> list:
        engine = Engine(EngineConfig(model=str(ckpt), dtype="bfloat16", block_size=4, kv_cache_memory=1 << 22))
        outs = engine.generate(prompts, params)
        packs = sum(len(m.linear._packs) for m in engine.executor.runner.model.modules() if hasattr(m, "linear")
                    and isinstance(m.linear, PackedLinear))
        return [(o.output_token_ids, o.logprobs) for o in outs], packs

    packed, n_packs = run()
    monkeypatch.setattr(PackedLinear, "enabled", False)
    plain, n_plain = run()
    assert n_packs > 10 and n_plain == 0  # the packed path ran, then it did not
    assert packed == plain
