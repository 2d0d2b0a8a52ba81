"""The C++ CPU kernels (``kernels/cpu/*.cpp``): built from source at first use with PyTorch's C++ extension
loader (gcc and ninja; a few seconds once per machine, cached under ``~/.cache/moeserve``, one build per source,
torch version and CPU since the code is compiled for the CPU it runs on), registered as ``torch.ops.moeserve_cpu``.
Their ops run where oneDNN's micro-kernel has bfloat16 tiles (AMX); ``MOESERVE_CPU_KERNELS=0`` turns them off.
Users: ``cpu_moe.py`` (routed experts), ``cpu_mla.py`` (MLA decode attention), ``cpu_norm.py`` (RMSNorm).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent / "cpu" / name for name in ("moe_experts.cpp", "mla_decode.cpp",
                                                                        "rms_norm.cpp")]
ENV = "MOESERVE_CPU_KERNELS"


def _build_directory() -> Path:
    """One build per source, torch version and CPU (the code is compiled for the CPU it runs on)."""
    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                     "")
    except OSError:
        pass
    code = b"".join(source.read_bytes() for source in SOURCES)
    key = hashlib.sha256(code + torch.__version__.encode() + flags.encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOESERVE_CACHE_DIR") or Path.home() / ".cache" / "moeserve")
    path = root / "cpu_kernels" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load_error() -> str | None:
    """Build (once per machine) and load the kernel library: None when its ops can run here, else why not."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    try:
        from torch.utils.cpp_extension import load

        # NOTE: -fopenmp links libgomp.so.1, the soname of the OpenMP runtime PyTorch ships and has loaded
        # already, so the kernel's parallel loops share PyTorch's thread pool and its thread count.
        # -ffast-math lets gcc vectorise exp (glibc's vector math): 1.4x on a decode step's experts. The sources
        # keep to finite values under it (no -inf sentinels)
        load(name="moeserve_cpu_kernels", sources=[str(source) for source in SOURCES],
             build_directory=str(_build_directory()), extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001  (no compiler, no ninja, a build error: the loop stays)
        logger.warning("the CPU kernels did not build (%s): the eager ops run instead",
                       str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return f"build failed: {e}"
    if not torch.ops.moeserve_cpu.available():
        return "oneDNN's micro-kernel has no bfloat16 tiles on this CPU (no AMX)"
    return None
