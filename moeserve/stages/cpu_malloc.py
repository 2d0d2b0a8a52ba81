"""glibc's allocator settings for a process that runs the model on CPU.

PyTorch's CPU tensors come from malloc. glibc serves every block above its mmap threshold (128 KB at start,
raised as blocks are freed, but never past 32 MB) with a fresh ``mmap`` and unmaps it on free, and trims the
heap's top past twice that threshold: a prefill step's largest activations (a [4096, 5632] product's output
is 46 MB, a float32 [8192, 1024] 32 MB) are page-faulted in, zeroed by the kernel, at every step. Keeping them in the heap instead -- what tcmalloc or
jemalloc, which vLLM's CPU build preloads, do by design -- cut a 4,096-token prefill step's CPU time by
8-18% on a 2-core AMX Xeon (BENCHMARKS.md, issue 26); decode steps, whose tensors are small, did not change.
The cost: memory freed after a peak stays with the process (up to ``TRIM_THRESHOLD`` at the heap's top).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # the largest value mallopt takes (an int): about 2 GiB kept at the heap's top


@functools.cache
def keep_freed_blocks() -> bool:
    """Apply the settings once per process (glibc on Linux only); whether they took effect."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
    if not ok:
        logger.info("glibc refused the allocator settings for CPU tensors; its defaults stay")
    return ok
