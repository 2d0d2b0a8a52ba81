"""Dummy weights (``load_format="dummy"``): a model filled from its config.json alone, on its own device.

``DummyReader`` stands in for a checkpoint: each tensor a real checkpoint of the config would hold is
generated whole, on the device of the parameter it fills, from a generator seeded by (seed, tensor name), and
then narrowed to the rank's share like a real one. So every layout (any pp / tp / ep, any rank) holds the same
model on a given device type (CPU and CUDA generators differ), and nothing is written to or read from disk.
Only the tensors of the rank's own layers and experts are generated; a tp-sharded one is generated whole
(one layer's largest tensor is a few hundred MB on DeepSeek-V3), then narrowed.

Values are sane for deep stacks: matrices normal with std 1/sqrt(fan_in) (each projection keeps the scale
of its input), norms one, V3's score-correction biases normal(0, 0.01). Matrices hold values the checkpoint's
dtype (``torch_dtype``) can store, as a real checkpoint's do, also where the model keeps them wider (the
routers' float32 copies of bf16 weights). With an FP8 config the tensors a
real checkpoint stores in float8 are generated as float8 with float32 block scales (values spread over the
e4m3 range, scales varying per block around std / spread), and dequantized like real ones unless kept.
"""

from __future__ import annotations

import hashlib
import math

import torch

from moeserve.model.fp8 import FP8_DTYPE, FP8_MAX, dequantize_into, is_fp8_weight, scale_shape

FP8_SPREAD = 64.0  # float8 values are normal(0, FP8_SPREAD) clamped to e4m3's range, like block-quantized weights
BIAS_STD = 0.01


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor, the same in every process (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class DummyReader:
    """The ``TensorSource`` of a checkpoint that is not on disk: ``shapes`` maps each tensor name to its full
    shape; ``block`` is the config's FP8 block (None: a bf16 checkpoint)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], block: tuple[int, int] | None,
                 device: torch.device, seed: int = 0, stored_dtype: torch.dtype = torch.float32):
        self.shapes, self.block, self.device, self.seed = shapes, block, device, seed
        self.stored_dtype = stored_dtype  # the checkpoint's dtype: the matrices' values are rounded to it

    def has(self, name: str) -> bool:
        return name in self.shapes

    def _generator(self, name: str) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(tensor_seed(self.seed, name))

    def _normal(self, shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32).mul_(std)

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        shape = self.shapes[name]
        if self.block is not None and is_fp8_weight(name, shape):
            weight, scale = self.read_fp8(name)
            return dequantize_into(torch.empty(shape, dtype=dtype, device=self.device), weight, scale, self.block)
        if name.endswith("e_score_correction_bias"):
            return self._normal(shape, BIAS_STD, self._generator(name))
        if len(shape) == 1:  # RMSNorm weights
            return torch.ones(shape, device=self.device)
        return self._normal(shape, shape[-1] ** -0.5, self._generator(name)).to(self.stored_dtype).float()

    def read_fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.shapes[name]
        assert self.block is not None and is_fp8_weight(name, shape), f"{name} is not float8 in this checkpoint"
        gen = self._generator(name)
        weight = self._normal(shape, FP8_SPREAD, gen).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scale = torch.empty(scale_shape(shape, self.block), device=self.device).uniform_(0.5, 1.5, generator=gen)
        return weight, scale.mul_(1.0 / (FP8_SPREAD * math.sqrt(shape[-1])))
