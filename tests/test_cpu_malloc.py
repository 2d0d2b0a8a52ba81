"""The allocator settings of a CPU model process (stages/cpu_malloc.py): a later large tensor of the same size
reuses the first one's memory instead of page-faulting in a fresh mapping."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from moeserve.stages.cpu_malloc import keep_freed_blocks
if sys.argv[1] == "on":
    assert keep_freed_blocks()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(4):
    before = faults()
    x = torch.ones(16 << 20)  # 64 MB (past the 32 MB glibc adapts its threshold up to), every page written
    del x
    counts.append(faults() - before)
print(min(counts[1:]))  # after the first: a small allocation between may split the freed block once
"""


def second_allocation_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_large_tensors_reuse_heap_memory_instead_of_fresh_mappings():
    pages = (64 << 20) // 4096
    assert second_allocation_faults("off") >= pages // 2  # glibc's default: a fresh mmap, faulted in again
    assert second_allocation_faults("on") < pages // 10
