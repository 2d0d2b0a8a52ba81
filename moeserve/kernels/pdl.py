"""Programmatic dependent launch (PDL, Hopper and later): a decode step's next kernel is launched while the one
before it still runs, so its launch and its programs' start overlap the previous kernel's last programs.

A kernel launched this way (``launch_pdl`` with its ``PDL`` constexpr on) calls ``pdl_enter`` first: it lets the
kernel after it launch early, then waits until the kernel before it has finished and its writes are visible.
Nothing is read or written before that wait, so the results are those of plain stream order; what is saved is
the gap between kernels. A kernel launched without PDL (cuBLAS, torch's own) waits for the whole previous one,
as always. On by default where the device has it (compute capability 9.0 and later); ``MOESERVE_PDL=0`` turns
it off. On one H100 it took 1.7% off a V2-Lite decode step at batch 1 and 1.1% at 256, nothing measurable at 64
(``benchmarks/profile_decode.py``, BENCHMARKS.md: issue 20's fourteenth pass). Loading the next kernel's first
weights before its wait, or prefetching them into the L2, made a chain of matrix-vector products slower.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from moeserve.kernels import interpreting

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: PDL stays off
    gdc_launch_dependents = gdc_wait = None

PDL_ENV = "MOESERVE_PDL"


@triton.jit
def pdl_enter(ENABLED: tl.constexpr):
    """The first statement of a kernel that may be launched with PDL."""
    if ENABLED:
        gdc_launch_dependents()
        gdc_wait()


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_args(device: torch.device) -> dict:
    """Keyword arguments for a launch on ``device``: the ``PDL`` constexpr and, where it is on, ``launch_pdl``."""
    on = (device.type == "cuda" and gdc_wait is not None and not interpreting()
          and os.environ.get(PDL_ENV, "1") != "0" and _device_supports(torch.cuda.current_device() if device.index is None else device.index))
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
