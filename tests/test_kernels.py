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
    env = dict(os.environ)
    if not torch.cuda.is_available():
        if (why := _interpreter_broken()) is not None:
            pytest.skip(why)
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *map(str, CASES)],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=CASES[0].parent.parent)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"kernel cases ({'GPU' if torch.cuda.is_available() else 'CPU, Triton interpreter'}): {summary}")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in summary
