"""The engine in bfloat16 on CPU, with its C++ kernels (routed experts, MLA decode, MLA's rope and cache write,
RMSNorm), against the float32 HF reference: every greedy token must be the reference's argmax for the same
prefix, or within bf16's rounding of it (the reference's own bf16 run measures that rounding on the same
tokens). A near tie is reported with its gap, so that it is told apart from a bug."""

from __future__ import annotations

import oracle_reference
import pytest
import torch

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams
from moeserve.kernels import cpu_build

pytestmark = pytest.mark.skipif(cpu_build.load_error() is not None,
                                reason=f"CPU kernels unavailable: {cpu_build.status()}")


@torch.no_grad()
def test_bf16_tokens_follow_the_float32_reference(ckpt_factory) -> None:
    ckpt = ckpt_factory("v2_qlora_group_yarn")  # YaRN rope, grouped routing, experts the MoE kernel takes
    prompts = [[5, 17, 29, 3, 88, 41], [7] * 11, list(range(40, 63))]
    new = 14
    engine = Engine(EngineConfig(model=str(ckpt), dtype="bfloat16", max_num_seqs=4, kv_cache_memory=1 << 24))
    try:
        outs = engine.generate(prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    finally:
        engine.close()
    ref32 = oracle_reference.load_reference(ckpt)
    ref16 = oracle_reference.load_reference(ckpt).bfloat16()
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt + out.output_token_ids])
        logits32 = ref32(ids).logits[0, len(prompt) - 1:-1].float()  # the logits each generated token came from
        logits16 = ref16(ids).logits[0, len(prompt) - 1:-1].float()
        rounding = float((logits16 - logits32).abs().max())  # bf16's error on this model and these tokens
        chosen = logits32.gather(1, torch.tensor(out.output_token_ids).unsqueeze(1)).squeeze(1)
        gaps = logits32.max(dim=1).values - chosen  # 0 where the engine took the reference's argmax
        assert len(out.output_token_ids) == new
        assert float(gaps.max()) <= 2 * rounding, (
            f"token {int(gaps.argmax())} of prompt {prompt[:4]}...: the engine's choice is {float(gaps.max()):.4f} "
            f"below the float32 argmax, more than twice bf16's rounding here ({rounding:.4f})")
        assert (gaps == 0).float().mean() >= 0.8, gaps.tolist()  # near ties are rare, not the rule
