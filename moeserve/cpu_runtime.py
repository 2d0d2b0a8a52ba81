"""The libraries a process that runs an engine on CPU is started with: jemalloc and Intel's OpenMP runtime,
preloaded the way CPU inference stacks do it.

**jemalloc.** glibc's malloc hands every large freed block (a prefill step's activations are 8-46 MB each) back
to the kernel and page-faults it in afresh at the next step: on a 2-core AMX Xeon a 64 x 128-token bench run took
about 1.1 million minor faults and 1.8-4 s of system time, and its wall time moved 6.3-9.0 s from run to run
with that system time (BENCHMARKS.md, issue 26). jemalloc told to keep what it frees (no decay, no separate
arena that purges oversize blocks at once) serves those blocks again from the process's own memory: the same
run took 5.8-6.1 s. vLLM's CPU backend preloads tcmalloc for the same reason, and Intel's launcher jemalloc.

**Intel OpenMP (libiomp5).** PyTorch's wheels run their parallel loops on GNU OpenMP (libgomp), whose thread
pool ends the threads a smaller team leaves idle and creates them again for the next larger one. PyTorch's own
loops avoid that by always asking for the whole team (pytorch/pytorch#32008); oneDNN does not: its products at
decode sizes ask for fewer threads than there are (one per block of work). So at many threads a decode step
ends and re-creates threads around every such product: 7 threads a batched product of MLA's query, 28 a step
of bench_cpu's model at 16 threads (seen with gdb in ``gomp_team_start``). Intel's runtime, which implements
the GNU entry points, keeps its idle threads: preloaded, it serves torch, oneDNN and moeserve's kernels as the
one runtime. PyTorch's CPU tuning guide and Intel's launcher preload it; the ``intel-openmp`` package (the
``cpu`` extra) installs it.

A library can only be preloaded before the process starts: ``moeserve``'s command re-executes itself once with
``preload_env()`` (``reexec_with_preloads``), and the processes it starts inherit the environment. The price of
jemalloc is that a process keeps the peak of what it allocated until it exits.
``MOESERVE_CPU_ALLOCATOR=system`` keeps glibc's malloc and ``MOESERVE_CPU_OPENMP=gnu`` PyTorch's libgomp;
``MOESERVE_JEMALLOC`` and ``MOESERVE_IOMP`` name the libraries where they are not in the usual places
(jemalloc: Debian/Ubuntu ``apt-get install libjemalloc2``; libiomp5: ``pip install intel-openmp``, which puts
it in the environment's ``lib``).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

# never purge what is freed (dirty or muzzy), and no oversize arena (which purges at once)
MALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_DONE = "MOESERVE_ALLOCATOR_SET"  # set in the re-executed process: never twice
_ALLOCATORS = ("jemalloc", "tcmalloc")  # preloaded, either serves a CPU engine
_IOMP = "libiomp5"


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _find_library(environ: Mapping[str, str] | None, variable: str, dirs: tuple[str, ...],
                  names: tuple[str, ...]) -> str | None:
    """The file that ``variable`` names in ``environ`` (None if it is not a file), else the first of ``names``
    in ``dirs``, else None."""
    named = _environ(environ).get(variable)
    if named:
        return named if Path(named).is_file() else None
    return next((str(Path(d) / n) for d in dirs for n in names if (Path(d) / n).is_file()), None)


def find_jemalloc(environ: Mapping[str, str] | None = None) -> str | None:
    """The path of libjemalloc's shared library (``MOESERVE_JEMALLOC`` in ``environ``, default this process's
    environment, else the linker's usual places), or None."""
    found = _find_library(environ, "MOESERVE_JEMALLOC", _DIRS, ("libjemalloc.so.2", "libjemalloc.so"))
    if found or _environ(environ).get("MOESERVE_JEMALLOC"):
        return found
    found = ctypes.util.find_library("jemalloc")
    return found if found and Path(found).is_absolute() else None


def find_iomp(environ: Mapping[str, str] | None = None) -> str | None:
    """The path of Intel's OpenMP runtime (``MOESERVE_IOMP``, else this environment's ``lib`` where the
    ``intel-openmp`` package puts it, else the usual places), or None."""
    dirs = (str(Path(sys.prefix) / "lib"), *_DIRS, "/opt/intel/oneapi/compiler/latest/lib")
    return _find_library(environ, "MOESERVE_IOMP", dirs, (f"{_IOMP}.so",))


def preloaded_by(ld_preload: str) -> str | None:
    """The allocator (``jemalloc`` / ``tcmalloc``) that an ``LD_PRELOAD`` value preloads, or None."""
    return next((name for name in _ALLOCATORS if name in ld_preload), None)


def iomp_preloaded_by(ld_preload: str) -> bool:
    """Whether an ``LD_PRELOAD`` value preloads Intel's OpenMP runtime."""
    return _IOMP in ld_preload


def preloaded() -> str | None:
    """The allocator preloaded into this process (``jemalloc`` / ``tcmalloc``), or None for the system's."""
    return preloaded_by(os.environ.get("LD_PRELOAD", ""))


def _mapped() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


def in_use() -> str:
    """The malloc this process runs on, from the libraries mapped into it: jemalloc, tcmalloc or system."""
    maps = _mapped()
    return next((name for name in _ALLOCATORS if f"lib{name}" in maps), "system")


def openmp_in_use() -> str:
    """The OpenMP runtime this process's parallel loops run on: ``intel`` where libiomp5 is mapped (preloaded,
    it takes the GNU entry points), else ``gnu``."""
    return "intel" if _IOMP in _mapped() else "gnu"


def describe() -> str:
    """One line for ``moeserve check``: the malloc a CPU engine started by the ``moeserve`` command runs on."""
    if os.environ.get("MOESERVE_CPU_ALLOCATOR", "jemalloc") == "system":
        return "system malloc (MOESERVE_CPU_ALLOCATOR=system)"
    if preloaded():
        return f"{preloaded()} (preloaded by the environment)"
    lib = find_jemalloc()
    if lib is None:
        return ("system malloc: jemalloc not found (apt-get install libjemalloc2, or MOESERVE_JEMALLOC=path); "
                "CPU steps page-fault their large buffers in afresh")
    return f"jemalloc for CPU engines ({lib})"


def describe_openmp() -> str:
    """One line for ``moeserve check``: the OpenMP runtime a CPU engine started by the command runs on."""
    if os.environ.get("MOESERVE_CPU_OPENMP", "intel") == "gnu":
        return "GNU OpenMP, PyTorch's libgomp (MOESERVE_CPU_OPENMP=gnu)"
    if iomp_preloaded_by(os.environ.get("LD_PRELOAD", "")):
        return "Intel OpenMP (preloaded by the environment)"
    lib = find_iomp()
    if lib is None:
        return ("GNU OpenMP, PyTorch's libgomp: Intel's libiomp5 not found (pip install intel-openmp, or "
                "MOESERVE_IOMP=path); at many threads oneDNN's small products end and re-create its threads")
    return f"Intel OpenMP for CPU engines ({lib})"


def preload_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables to add to ``environ`` (default: this process's) so that a process started with them runs
    on jemalloc and Intel OpenMP: each where it is installed, not turned off and not already preloaded; empty
    where neither applies."""
    env = _environ(environ)
    text = env.get("LD_PRELOAD", "")
    if sys.platform != "linux":
        return {}
    libs, extra = [], {}
    if env.get("MOESERVE_CPU_ALLOCATOR", "jemalloc") != "system" and not preloaded_by(text):
        lib = find_jemalloc(env)
        if lib is not None:
            libs.append(lib)
            extra["MALLOC_CONF"] = env.get("MALLOC_CONF") or MALLOC_CONF
    if env.get("MOESERVE_CPU_OPENMP", "intel") != "gnu" and not iomp_preloaded_by(text):
        lib = find_iomp(env)
        if lib is not None:
            libs.append(lib)
    if not libs:
        return {}
    return {"LD_PRELOAD": ":".join([*libs, text] if text else libs), **extra, _DONE: "1"}


def shared_cores_env(environ: Mapping[str, str], processes: int) -> dict[str, str]:
    """Variables for ``processes`` engine processes (ranks or replicas) that share this machine's cores: Intel
    OpenMP's threads then wait 1 ms for more work before they sleep, instead of the default 200 ms that another
    process's threads would spend spinning beside them (``tests/test_distributed_engine.py`` on 2 cores: 63 s
    against 52 on GNU OpenMP, 52 with this). Unchanged where the user set ``KMP_BLOCKTIME``, and for one
    process, which keeps the default it was measured with (BENCHMARKS.md, issue 26)."""
    return {"KMP_BLOCKTIME": "1"} if processes > 1 and "KMP_BLOCKTIME" not in environ else {}


def reexec_with_preloads(argv: list[str]) -> None:
    """Replace this process by ``python -m moeserve.launch.cli *argv`` with jemalloc and Intel OpenMP preloaded,
    where ``preload_env`` offers them and this process is not already such a one; returns only where it does
    not."""
    if os.environ.get(_DONE):
        return
    extra = preload_env()
    if not extra:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "moeserve.launch.cli", *argv], {**os.environ, **extra})
