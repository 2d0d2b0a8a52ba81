"""The C++ CPU kernels (``kernels/cpu/*.cpp``): built from source at first use with PyTorch's C++ extension
loader (gcc and ninja; a few seconds once per machine, cached under ``~/.cache/moeserve``, one build per source,
torch version and CPU since the code is compiled for the CPU it runs on), registered as ``torch.ops.moeserve_cpu``.
The MoE kernel runs where oneDNN's micro-kernel has bfloat16 tiles (AMX, ``amx_tiles``), MLA decode where the
compiler had AVX-512 BF16, RMSNorm wherever they built; ``MOESERVE_CPU_KERNELS=0`` turns them all off.
Users: ``cpu_moe.py`` (routed experts), ``cpu_mla.py`` (MLA decode attention, the rotary embedding and the
latent cache write), ``cpu_norm.py`` (RMSNorm).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

from moeserve.cpu_runtime import iomp_preloaded_by

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent / "cpu"
SOURCES = [_HERE / name for name in ("moe_experts.cpp", "mla_decode.cpp", "mla_decode_amx.cpp", "mla_prologue.cpp",
                                     "rms_norm.cpp")]
# not compiled alone, but a change to one must rebuild
HEADERS = [_HERE / name for name in ("bf16_bits.h", "mla_decode_amx.h", "rms_row.h", "row_grain.h")]
ENV = "MOESERVE_CPU_KERNELS"


def _build_directory() -> Path:
    """One build per source, torch version and CPU (the code is compiled for the CPU it runs on)."""
    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                     "")
    except OSError:
        pass
    code = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(code + torch.__version__.encode() + flags.encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOESERVE_CACHE_DIR") or Path.home() / ".cache" / "moeserve")
    path = root / "cpu_kernels" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load_error() -> str | None:
    """Build (once per machine) and load the kernel library: None when its ops are registered, else why not."""
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
    return None


@functools.cache
def amx_tiles() -> bool:
    """The library loaded and oneDNN's micro-kernel has bfloat16 tiles here (what the MoE kernel runs on)."""
    return load_error() is None and bool(torch.ops.moeserve_cpu.amx_tiles())


@functools.cache
def mla_tiles() -> bool:
    """The library loaded and its MLA decode runs on AMX tiles here (built with them, and granted them)."""
    return load_error() is None and bool(torch.ops.moeserve_cpu.mla_tiles())


@functools.cache
def mla_vectorized() -> bool:
    """The library loaded and its MLA decode was compiled with AVX-512 BF16 (else it would be scalar code)."""
    return load_error() is None and bool(torch.ops.moeserve_cpu.mla_vectorized())


def openmp_runtimes() -> list[str]:
    """The OpenMP runtimes this process's parallel loops run on. One is right: the kernels' parallel loops must
    share PyTorch's thread pool; a second (a system libgomp beside a wheel's vendored copy) would run its own
    team of threads beside it, two threads per core. A preloaded Intel runtime (``moeserve/cpu_runtime.py``)
    takes the GNU entry points of every library, so the libgomp PyTorch still maps beside it runs nothing."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    names = ("libgomp", "libiomp", "libomp")
    found = sorted({line.split()[-1] for line in maps if any(n in line.rsplit("/", 1)[-1] for n in names)})
    if iomp_preloaded_by(os.environ.get("LD_PRELOAD", "")):
        found = [f for f in found if "libgomp" not in f.rsplit("/", 1)[-1]]
    return found


def status() -> str:
    """What runs, in words (``moeserve check`` and the runner's log)."""
    why_not = load_error()
    if why_not is not None:
        return f"off ({why_not.splitlines()[0]})"
    mla = "MLA decode" + (" (AMX tiles)" if mla_tiles() else "")
    on = [name for name, ok in (("MoE experts", amx_tiles()), (mla, mla_vectorized()), ("RMSNorm", True),
                                ("MLA rope and cache write", True)) if ok]
    runtimes = openmp_runtimes()
    return ("bfloat16: " + ", ".join(on) + ("" if amx_tiles() else " (no AMX: the MoE experts stay eager)")
            + (f"; WARNING: {len(runtimes)} OpenMP runtimes loaded ({', '.join(runtimes)})" if len(runtimes) > 1
               else ""))
