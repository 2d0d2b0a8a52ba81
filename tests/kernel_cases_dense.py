"""The dense small-row linear (``kernels/dense_gemv.py``) against ``F.linear`` (run by ``tests/test_kernels.py``
with the other kernel cases: on a GPU, or under Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICE, DTYPES, rel_err, tol

from moeserve.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install triton)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(72, 200), (300, 1000), (16, 128)])
def test_dense_gemv_matches_linear(dtype, rows, shape):
    """Ragged row tiles and reduction pieces, every row count up to the limit, a strided x."""
    from moeserve.kernels.dense_gemv import dense_gemv

    n, k = shape
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(DEVICE)
    x_wide = torch.randn(rows, k + 8, generator=gen).to(dtype).to(DEVICE)
    x = x_wide[:, 3:3 + k]  # a row stride wider than k
    out = dense_gemv(x, w)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert rel_err(out, F.linear(x, w)) < tol(dtype)


def test_dense_gemv_splits_cover_the_reduction():
    from moeserve.kernels.dense_gemv import BLOCK_K, splits_for

    assert splits_for(16, 64) == 1  # one step of the reduction: one piece
    assert splits_for(3072, 2048) * BLOCK_K <= 2048 and splits_for(3072, 2048) >= 2
    assert splits_for(10 ** 6, 4096) == 1  # rows enough for the device: no split


def test_the_check_turns_a_wrong_small_rows_linear_off_alone(tmp_path, monkeypatch):
    """The start-up check judges the kernel against the library GEMM on the model's own activations: a
    correct one stays on, a wrong one is turned off with the reason and the other kernels stay on."""
    import moeserve.kernels.dense_gemv as dense
    from kernel_cases_moe import _check_engine

    (tmp_path / "right").mkdir()
    (tmp_path / "wrong").mkdir()
    model = _check_engine(tmp_path / "right").runner.model
    assert model.layers["0"].self_attn.fused_linear and model.layers["0"].self_attn.fused
    right = dense.dense_gemv
    monkeypatch.setattr(dense, "dense_gemv", lambda x, w: right(x, w) * 1.5)
    engine = _check_engine(tmp_path / "wrong")
    attn = engine.runner.model.layers["0"].self_attn
    assert not attn.fused_linear and attn.fused
    assert "linear kernel differs" in (engine.runner.fast_path_error or "")
