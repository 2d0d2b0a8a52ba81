"""The few-row dense kernels (moeserve/kernels/dense_gemv.py) against ``F.linear`` / ``torch.bmm``, run as
``kernel_cases.py`` is (see ``tests/test_kernels.py``): on a CUDA device at DeepSeek-V2-Lite's and V3's
decode shapes, or on the CPU under Triton's interpreter at cut sizes, float32 only (the interpreter's
``tl.dot`` reads bfloat16 operands wrong). References in float64 from the same inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICE, DTYPES, rel_err

from moeserve.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install triton)")
GPU = DEVICE.type == "cuda"
# weights [N, K]: V2-Lite's fused q + latent projection and o_proj; V3's q_a + kv_a, q_b and o_proj. On the CPU
# N and K are cut, N to sizes that leave a ragged last tile
DENSE = [(3648, 2048), (2048, 2048), (2112, 7168), (24576, 1536), (7168, 16384)] if GPU else \
    [(231, 2048), (131, 512), (133, 1024), (385, 384), (117, 1024)]
# (heads, K, N) of W_UK [H, nope, kv_lora] and W_UV^T [H, kv_lora, v]: V2-Lite's 16 heads, V3's 128
BMM = [(16, 128, 512), (16, 512, 128), (128, 128, 512), (128, 512, 128)] if GPU else \
    [(2, 128, 512), (3, 512, 128)]
# every tile width, both step lengths and stage counts the sweep tries (benchmarks/bench_dense_gemv.py)
CONFIGS = [(4, 512, 1, 4), (8, 256, 1, 3), (16, 128, 2, 2), (32, 256, 4, 4), (16, 512, 1, 3), (32, 64, 2, 3)]


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2  # float32 products run exact ("ieee")


def _dense_case(dtype, m, n, k):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    return x, w, F.linear(x.double(), w.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", DENSE, ids=lambda v: str(v))
def test_dense_gemv(dtype, m, n, k):
    from moeserve.kernels.dense_gemv import dense_gemv

    x, w, ref = _dense_case(dtype, m, n, k)
    y = dense_gemv(x, w)
    assert y.shape == (m, n) and y.dtype == dtype and rel_err(y, ref) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("k", [200, 256])  # a reduction no multiple of the step (masked), and one that is
def test_dense_gemv_configs(dtype, config, k):
    """Every tile computes the same function, also where N (37) leaves a ragged tile and x's rows are strided
    (a slice of wider rows)."""
    from moeserve.kernels.dense_gemv import dense_gemv

    for m in (1, 3):
        x, w, _ = _dense_case(dtype, m, 37, k + 8)
        x, w = x[:, 8:], w[:, 8:]  # strided rows of both, as a slice of a fused projection's output would be
        y = dense_gemv(x, w, config=config)
        assert rel_err(y, F.linear(x.double(), w.double())) < tol(dtype)


def _bmm_case(dtype, heads, m, k, n):
    """x as MLA passes it ([B, H, K] viewed [H, B, K]) and out the [H, B, N] view of a wider [B, H, *] buffer,
    as ``MLA._decode`` writes the latent part of its query buffer."""
    x = torch.randn(m, heads, k, device=DEVICE).to(dtype).transpose(0, 1)
    w = (torch.randn(heads, k, n, device=DEVICE) / k ** 0.5).to(dtype)
    buf = torch.full((m, heads, n + 24), 7.0, device=DEVICE, dtype=dtype)
    return x, w, buf, buf.transpose(0, 1)[..., 16:16 + n], torch.bmm(x.double(), w.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("heads,k,n", BMM, ids=lambda v: str(v))
def test_bmm_small(dtype, m, heads, k, n):
    from moeserve.kernels.dense_gemv import bmm_small

    x, w, buf, out, ref = _bmm_case(dtype, heads, m, k, n)
    assert bmm_small(x, w, out) is out
    assert rel_err(out, ref) < tol(dtype)
    assert (buf[..., :16] == 7).all() and (buf[..., 16 + n:] == 7).all()  # nothing written outside the view
    fresh = bmm_small(x, w)
    assert fresh.shape == (heads, m, n) and fresh.is_contiguous() and torch.equal(fresh, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_bmm_small_configs(dtype, config):
    """Ragged tiles on both axes: N = 40 (no multiple of 16 or 32) and K = 100 (no multiple of any step)."""
    from moeserve.kernels.dense_gemv import bmm_small

    for m in (1, 4):
        x, w, _, out, ref = _bmm_case(dtype, 3, m, 100, 40)
        bmm_small(x, w, out, config=config)
        assert rel_err(out, ref) < tol(dtype)


def test_shapes_the_kernels_refuse():
    from moeserve.kernels.dense_gemv import bmm_small, dense_gemv

    x = torch.randn(5, 64, device=DEVICE)
    with pytest.raises(AssertionError, match="5 rows"):
        dense_gemv(x, torch.randn(32, 64, device=DEVICE))
    with pytest.raises(AssertionError, match="contiguous"):
        dense_gemv(x[:2], torch.randn(64, 32, device=DEVICE).T)  # K-strided weight
    with pytest.raises(AssertionError):
        dense_gemv(x[:2], torch.randn(32, 64, device=DEVICE, dtype=torch.float64))
    with pytest.raises(AssertionError, match="contiguous"):
        bmm_small(torch.randn(2, 1, 64, device=DEVICE), torch.randn(2, 32, 64, device=DEVICE).transpose(1, 2))
    with pytest.raises(AssertionError):
        bmm_small(torch.randn(2, 1, 64, device=DEVICE), torch.randn(2, 64, 32, device=DEVICE),
                  out=torch.empty(2, 1, 33, device=DEVICE))
