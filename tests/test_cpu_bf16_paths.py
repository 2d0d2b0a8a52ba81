"""The CPU bf16 fast paths of a long prefill: products in blocks of rows (PackedLinear, the MLP), and MLA's
prefill attention on torch's flash kernel (v padded to q's head width). Blocks give the unblocked numbers up
to bf16 rounding (oneDNN may split a long reduction differently for another number of rows); the attention
agrees with the float32 model within bf16 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeserve.model.cpu_linear import AVAILABLE, BLOCK_OUTPUT_BYTES, MIN_BLOCK_ROWS, PackedLinear, row_block
from moeserve.model.layers import MLP


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_row_block_rule() -> None:
    assert row_block(64, 8192) == 64  # few rows: one call
    assert row_block(4096, 1024) == 2048  # 4 MB of output per block
    assert row_block(4096, 5632) == 320
    assert row_block(4096, 129280) == MIN_BLOCK_ROWS
    assert row_block(700, 4096) == 700  # within half a block of one: no short tail block
    for n in (1024, 2048, 5632, 8192):
        assert row_block(1 << 20, n) * n * 2 <= max(BLOCK_OUTPUT_BYTES, MIN_BLOCK_ROWS * n * 2)


@pytest.mark.skipif(not AVAILABLE, reason="no oneDNN bf16 linear kernels here (this torch lacks them, or this CPU: they need AVX-512 or AVX-NE-CONVERT)")
def test_packed_linear_in_row_blocks_equals_f_linear() -> None:
    torch.manual_seed(0)
    w = torch.randn(4096, 512, dtype=torch.bfloat16)
    assert row_block(1000, 4096) < 1000  # the cases below are split
    layer = PackedLinear()
    x = torch.randn(1000, 512, dtype=torch.bfloat16)
    x3 = torch.randn(2, 500, 512, dtype=torch.bfloat16)
    strided = torch.randn(1000, 600, dtype=torch.bfloat16)[:, :512]  # a split view, as MLA passes
    for a in (x, x3, strided):
        got, ref = layer(a, w, "w"), F.linear(a, w)
        assert got.shape == ref.shape
        assert rel_err(got, ref) < 1e-2


@torch.no_grad()
def test_mlp_in_row_blocks_equals_whole() -> None:
    torch.manual_seed(1)
    mlp = MLP(64, 2048, dtype=torch.bfloat16)
    mlp.gate_up_proj.normal_(std=0.1)
    mlp.down_proj.normal_(std=0.1)
    x = torch.randn(1100, 64, dtype=torch.bfloat16)
    assert row_block(1100, 4096) < 1100
    assert rel_err(mlp(x), mlp._swiglu(x)) < 1e-2


@torch.no_grad()
def test_bf16_prefill_attention_takes_flash_and_matches_float32(monkeypatch) -> None:
    """All-token logits of a two-prompt prefill against float32's: bf16 with v padded (torch's flash kernel)
    is as close as bf16 through SDPA's matmul-softmax path (v unpadded)."""
    from moeserve.model.attn_metadata import build_attn_metadata
    from moeserve.model.config import ModelConfig
    from moeserve.model.deepseek import DeepseekModel
    from moeserve.model.synthetic import init_random_, tiny_config

    config = ModelConfig.from_dict(tiny_config())
    assert config.qk_nope_head_dim + config.qk_rope_head_dim > config.v_head_dim  # padding applies
    sdpa, widths, unpad = F.scaled_dot_product_attention, [], [False]

    def spy(q, k, v, **kw):
        widths.append((q.dtype, q.shape[-1] == v.shape[-1]))
        if unpad[0] and q.shape[-1] == v.shape[-1]:  # the path before: v at its own width
            return F.pad(sdpa(q, k, v[..., :config.v_head_dim], **kw), (0, q.shape[-1] - config.v_head_dim))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = init_random_(DeepseekModel(config), seed=4, std=0.2)
    block_size, q_lens = 8, [13, 21]
    tables = torch.arange(8).view(2, 4)
    ids = torch.randint(2, 256, (sum(q_lens),), generator=torch.Generator().manual_seed(5))
    logits = {}
    for name, dtype in (("float32", torch.float32), ("flash", torch.bfloat16), ("matmul", torch.bfloat16)):
        unpad[0] = name == "matmul"
        model = model.to(dtype)
        caches = {int(i): torch.zeros(8 * block_size, config.kv_cache_dim, dtype=dtype) for i in model.layers}
        meta = build_attn_metadata(tables, torch.tensor([0, 0]), torch.tensor(q_lens), block_size)
        logits[name] = model(ids, meta, caches, all_logits=True).float()
    assert set(widths) == {(torch.float32, False), (torch.bfloat16, True)}
    flash, matmul = rel_err(logits["flash"], logits["float32"]), rel_err(logits["matmul"], logits["float32"])
    assert flash < 1.5 * matmul + 1e-3 and flash < 0.06
