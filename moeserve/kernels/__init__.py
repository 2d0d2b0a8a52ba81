"""Fused kernels and their launchers: a leaf package (no runner, engine or stage code).

- GPU kernels in Triton (``fused_moe.py``, ``mla_*.py``, ...). ``tests/test_kernels.py`` compares each with
  the eager code it replaces (on a GPU, or on the CPU through Triton's interpreter, ``TRITON_INTERPRET=1``).
- CPU kernels in C++ (``cpu/*.cpp``, built at first use by ``cpu_build.py``; ``cpu_moe.py``, ``cpu_mla.py``,
  ``cpu_norm.py``) for bfloat16 models on x86; ``tests/test_cpu_*_kernel.py`` compare them with the eager ops.

The eager path stays wherever a kernel cannot run: on NPUs, without Triton (GPU kernels), without a compiler
or the CPU features a C++ kernel needs, and for float32 models (the reference the tests compare with HF's).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001  (absent, or present without a usable backend)
        return False
    return True


def interpreting() -> bool:
    """Triton's CPU interpreter is on (tests of the kernels on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


FUSED_KERNELS_ENV = "MOESERVE_FUSED_KERNELS"


def kernels_apply(device: torch.device) -> bool:
    """Whether the fused kernels run for tensors on ``device``: CUDA devices with Triton, or any device under
    Triton's interpreter (tests only). ``MOESERVE_FUSED_KERNELS=0`` turns them off everywhere: every step runs
    the eager ops, with no start-up check or CUDA graphs (to tell a kernel's fault from the model's)."""
    if not triton_available() or os.environ.get(FUSED_KERNELS_ENV) == "0":
        return False
    return device.type == "cuda" or interpreting()


def dot_precision(dtype: torch.dtype) -> str | None:
    """Triton's ``input_precision`` for a product of ``dtype`` operands: float32 stays exact ("ieee", the
    precision the float32 tests compare in) instead of Triton's default tf32; other dtypes keep the default."""
    return "ieee" if dtype == torch.float32 else None
