"""The CPU RMSNorm kernel (kernels/cpu_norm.py) against torch's composite in bfloat16, the steps the model's
eager RMSNorm takes: the residual sum bit for bit, the normalised rows within one bf16 unit where they differ
at all. Runs where the CPU kernels build; skips with the reason elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeserve.kernels import cpu_build, cpu_norm
from moeserve.model.layers import RMSNorm

pytestmark = pytest.mark.skipif(cpu_build.load_error() is not None,
                                reason=f"CPU kernels unavailable: {cpu_build.load_error()}")


def composite(x, weight, eps):
    return F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype).mul_(weight)


@pytest.mark.parametrize("rows,dim", [(1, 64), (37, 1024), (300, 512), (5, 100)])
def test_add_norm_matches_the_composite(rows, dim):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, dim, generator=gen).bfloat16()
    residual = (3 * torch.randn(rows, dim, generator=gen)).bfloat16()
    weight = (1 + 0.1 * torch.randn(dim, generator=gen)).bfloat16()
    with torch.inference_mode():
        out, total = cpu_norm.rms_norm(x, weight, 1e-6, residual)
        plain, same = cpu_norm.rms_norm(x, weight, 1e-6)
    assert torch.equal(total, residual + x) and torch.equal(same, x)
    for got, rows_in in ((out, residual + x), (plain, x)):
        want = composite(rows_in, weight, 1e-6)
        # a one-unit difference in the normalised row can carry through the weight product: two bf16 units
        ulp = want.float().abs().clamp_min(1e-30) * 2 ** -6
        assert ((got.float() - want.float()).abs() <= ulp).all()
        assert (got != want).float().mean() < 1e-3


def test_rmsnorm_module_takes_the_kernel_for_bf16_rows_only():
    norm = RMSNorm(64, 1e-6, torch.bfloat16)
    x = torch.randn(8, 64).bfloat16()
    with torch.inference_mode():
        assert cpu_norm.applies(x, norm.weight)
        assert not cpu_norm.applies(x.float(), norm.weight.float())  # float32: the reference composite
        assert not cpu_norm.applies(x.t(), norm.weight)  # strided rows
        got, total = norm.add_norm(x, x)
    assert torch.equal(total, x + x)
    assert ((got.float() - composite(x + x, norm.weight, 1e-6).float()).abs() <= 2 ** -7 * 4).all()
