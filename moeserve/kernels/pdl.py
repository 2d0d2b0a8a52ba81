"""Programmatic dependent launch (PDL, Hopper and later): a decode step's next kernel is launched while the one
before it still runs, so its launch and its programs' start overlap the previous kernel's last programs.

A kernel launched this way (``launch_pdl`` with its ``PDL`` constexpr on) calls ``pdl_enter`` first: it lets the
kernel after it launch early, then waits until the kernel before it has finished and its writes are visible.
Nothing is read or written before that wait, so the results are those of plain stream order; what is saved is
the gap between kernels. A kernel launched without PDL (cuBLAS, torch's own) waits for the whole previous one,
as always. ``MOESERVE_PDL=1`` turns it on (off until measured in the engine).
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
          and os.environ.get(PDL_ENV) == "1" and _device_supports(device.index or 0))
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
