"""MLA's query and latent projections as one GEMM (``MLA.fuse_input_projections``, on for CUDA devices): the
logits equal the two-GEMM form's, the parameters become views of the fused weight (no memory added, a copy into
a parameter reaches the fused GEMM), and a parameter replaced by another tensor turns the fused GEMM off."""

from __future__ import annotations

import pytest
import torch

from moeserve.model.attn_metadata import build_attn_metadata
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.mla import MLA
from moeserve.model.synthetic import init_random_, tiny_config

BLOCK_SIZE = 8


def logits(model: DeepseekModel) -> torch.Tensor:
    """A prefill of two prompts, then a decode step: every token's logits."""
    caches = {int(i): torch.zeros(32 * BLOCK_SIZE, model.config.kv_cache_dim) for i in model.layers}
    tables = torch.arange(32).view(2, 16)
    gen = torch.Generator().manual_seed(3)
    out = []
    for computed, q_lens in (([0, 0], [19, 7]), ([19, 7], [1, 1])):
        ids = torch.randint(2, 256, (sum(q_lens),), generator=gen)
        meta = build_attn_metadata(tables, torch.tensor(computed), torch.tensor(q_lens), BLOCK_SIZE)
        out.append(model(ids, meta, caches, all_logits=True))
    return torch.cat(out)


@pytest.mark.parametrize("q_lora_rank", [None, 48])
@torch.no_grad()
def test_fused_input_projections_equal_two_gemms(q_lora_rank: int | None) -> None:
    model = init_random_(DeepseekModel(ModelConfig.from_dict(tiny_config(q_lora_rank=q_lora_rank))), seed=5, std=0.2)
    attn: MLA = next(m for m in model.modules() if isinstance(m, MLA))
    first = attn.q_proj if q_lora_rank is None else attn.q_a_proj
    unfused = logits(model)
    num_params = sum(p.numel() for p in model.parameters())
    model.fuse_input_projections()
    fused = attn._input_proj
    assert first.data_ptr() == fused.data_ptr() and attn.kv_a_proj_with_mqa.untyped_storage().data_ptr() == \
        fused.untyped_storage().data_ptr()  # views of the fused weight: nothing added
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert torch.allclose(logits(model), unfused, rtol=1e-5, atol=1e-5)

    # a copy into a parameter reaches the fused GEMM; a replaced parameter turns it off, and is used (another
    # weight, not a scaled one: q_a_layernorm would scale a scaled q_a back)
    attn.kv_a_proj_with_mqa.mul_(0.5)
    copied = logits(model)
    assert not torch.allclose(copied, unfused, rtol=1e-3, atol=1e-3)
    replacement = first.detach().clone()
    first.data = replacement
    assert torch.allclose(logits(model), copied, rtol=1e-5, atol=1e-5)
    first.data = replacement + 0.3 * torch.randn(replacement.shape, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(logits(model), copied, rtol=1e-3, atol=1e-3)
