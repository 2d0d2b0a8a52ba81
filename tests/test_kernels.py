"""The fused kernels' tests (``tests/kernel_cases*.py``), run in a process of their own.

On a CUDA device they run as they are; elsewhere (CI) under Triton's CPU interpreter, which must be switched
on (``TRITON_INTERPRET=1``) before Triton is first imported -- so not in this process, where other tests
may have imported it already.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = sorted(Path(__file__).parent.glob("kernel_cases*.py"))


def _interpreter_broken() -> str | None:
    """Triton before 3.7 interprets loops with NumPy calls that NumPy 2.4 refuses."""
    from importlib.metadata import version

    import numpy

    triton, numpy_version = version("triton"), numpy.__version__
    old = tuple(int(p) for p in triton.split(".")[:2]) < (3, 7)
    if old and tuple(int(p) for p in numpy_version.split(".")[:2]) >= (2, 4):
        return f"Triton {triton}'s interpreter fails with NumPy {numpy_version}: upgrade triton"
    return None


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (pip install triton)")
def test_kernel_cases() -> None:
    """On a GPU the case files run in one process. Under the interpreter (single-threaded Python, about 5 minutes
    on a 2-core CI machine) they run in two processes at once, the files dealt between them in turn, each held to
    one intra-op thread."""
    env = dict(os.environ)
    groups = [CASES]
    if not torch.cuda.is_available():
        if (why := _interpreter_broken()) is not None:
            pytest.skip(why)
        env["TRITON_INTERPRET"] = "1"
        if (os.cpu_count() or 1) >= 2:
            groups = [CASES[0::2], CASES[1::2]]
            env["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *map(str, group)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=CASES[0].parent.parent) for group in groups]
    where = "GPU" if torch.cuda.is_available() else "CPU, Triton interpreter"
    try:
        for proc, group in zip(procs, groups):
            out, err = proc.communicate(timeout=1200)
            summary = out.strip().splitlines()[-1] if out.strip() else ""
            print(f"kernel cases ({where}; {', '.join(c.name for c in group)}): {summary}")
            assert proc.returncode == 0, out[-6000:] + err[-3000:]
            assert " passed" in summary
    finally:  # a failed or timed-out group leaves no other running
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
