"""``PackedLinear``: bf16 linear layers on CPU through oneDNN, each weight packed once.

``F.linear`` on a CPU bf16 weight hands oneDNN a plain matrix, which it reorders into its blocked layout on
every call; at decode sizes (16-64 rows) that reorder costs about as much as the multiply. Packing each
weight once (``mkldnn._reorder_linear_weight``, as PyTorch's own CPU compiler does) and calling the packed
kernel gives the same result bit for bit, 20-30% faster on this project's CPU for the expert and projection
shapes of a decode step. The packed copy lives beside the weight (bf16 weights take twice the memory on
CPU), and is remade when the weight changes (new storage or an in-place write). Everything else -- other
devices and dtypes, autograd, a torch built without oneDNN -- goes through ``F.linear``.

Large products go through in blocks of rows (``row_block``): a 4,096-token prefill's [4096, 5632] output
is 46 MB, and oneDNN's one call for it ran at about 0.7 TFLOP/s of one AMX core where blocks whose output
stays near the core's L2 ran at 1.0-1.2 (BENCHMARKS.md). The result can differ from one call's in the last
bf16 bit (oneDNN may split a long reduction differently for another number of rows); float32 never goes
through here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F

_MKLDNN = getattr(torch.ops, "mkldnn", None)
# oneDNN's bf16 kernels need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT on x86: on a CPU with AVX2 alone (an AMD
# EPYC, BENCHMARKS.md "CPU, a fourth kind") packing a weight raises, and F.linear's own bf16 path is taken instead
AVAILABLE = (torch.backends.mkldnn.is_available() and _MKLDNN is not None
             and hasattr(_MKLDNN, "_linear_pointwise") and hasattr(_MKLDNN, "_reorder_linear_weight")
             and (not hasattr(_MKLDNN, "_is_mkldnn_bf16_supported") or bool(_MKLDNN._is_mkldnn_bf16_supported())))


# a block of rows of a large product writes at most this many bytes of output (about one core's L2)
BLOCK_OUTPUT_BYTES = 4 << 20
MIN_BLOCK_ROWS = 256


def row_block(num_rows: int, out_features: int, element_size: int = 2) -> int:
    """Rows per block for a product with ``out_features`` outputs per row: all rows when the whole output
    fits in ``BLOCK_OUTPUT_BYTES`` (or the rows are few), else a multiple of 64 rows whose output does."""
    rows = max(MIN_BLOCK_ROWS, BLOCK_OUTPUT_BYTES // max(1, out_features * element_size) // 64 * 64)
    return num_rows if num_rows <= rows + rows // 2 else rows


def by_row_blocks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, block: int,
                  out_features: int) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn`` on [T, in] -> [T, out_features], one block of rows at a time into one
    output (what a block leaves in cache is used before the next block starts)."""
    if x.shape[0] <= block:
        return fn(x)
    out = x.new_empty(x.shape[0], out_features)
    for start in range(0, x.shape[0], block):
        out[start:start + block] = fn(x[start:start + block])
    return out


def padded_rows(num_rows: int) -> int:
    """The row count a product runs at: oneDNN builds (JIT-compiles) a kernel for every new shape, about 5 ms
    for a [~1000, 1024] x [1024, 1024] bf16 product on this project's AMX CPU -- four times the product itself
    -- and a prefill's experts see a new row count at nearly every call. Up to 64 rows (decode batches) the
    count is kept; above, it is rounded up to a multiple of 32 (to 256) or of 64 (as ``row_block``'s blocks
    are), so that a few dozen shapes per weight serve every step and stay in oneDNN's primitive cache."""
    if num_rows <= 64:
        return num_rows
    step = 32 if num_rows <= 256 else 64
    return -(-num_rows // step) * step


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate | up) -> silu(gate) * up [..., I]: the product is taken in place in silu's output
    (one [..., I] tensor made, not two) unless autograd must see it."""
    gate, up = h.chunk(2, dim=-1)
    act = F.silu(gate)
    return act * up if act.requires_grad else act.mul_(up)


class PackedLinear:
    """One module's packed weights, by name. ``layer(x, weight, name)`` is ``F.linear(x, weight)``.

    ``pack=False``: always ``F.linear`` (weights rewritten at every call, e.g. dequantized FP8 experts, would
    be repacked at every call)."""

    enabled = AVAILABLE  # the switch for every instance (benchmarks and tests turn it off to compare)

    def __init__(self, pack: bool = True) -> None:
        self.pack = pack
        self._packs: dict[Hashable, tuple[tuple[int, int], torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, name: Hashable) -> torch.Tensor:
        if not (self.enabled and self.pack and x.device.type == "cpu" and x.dtype == torch.bfloat16
                and weight.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and
                                                            (x.requires_grad or weight.requires_grad))):
            return F.linear(x, weight)
        key = (weight.data_ptr(), weight._version)
        hit = self._packs.get(name)
        if hit is None or hit[0] != key:
            hit = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64))
            self._packs[name] = hit
        packed = hit[1]
        num_rows = x.numel() // x.shape[-1]
        rows = x.reshape(num_rows, x.shape[-1])
        out = by_row_blocks(lambda r: _packed_product(r, packed), rows, row_block(num_rows, weight.shape[0]),
                            weight.shape[0])
        return out.view(*x.shape[:-1], weight.shape[0])


def _packed_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, in] times a packed weight, run at ``padded_rows(M)`` rows (zeros appended; their outputs dropped)."""
    num_rows = x.shape[0]
    pad = padded_rows(num_rows) - num_rows
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return out[:num_rows] if pad else out
