"""jemalloc for processes that run an engine on CPU, set up the way CPU inference stacks do it.

glibc's malloc hands every large freed block (a prefill step's activations are 8-46 MB each) back to the
kernel and page-faults it in afresh at the next step: on a 2-core AMX Xeon a 64 x 128-token bench run took
about 1.1 million minor faults and 1.8-4 s of system time, and its wall time moved 6.3-9.0 s from run to run
with that system time (BENCHMARKS.md, issue 26). jemalloc told to keep what it frees (no decay, no separate
arena that purges oversize blocks at once) serves those blocks again from the process's own memory: the same
run took 5.8-6.1 s. vLLM's CPU backend preloads tcmalloc for the same reason, and Intel's launcher jemalloc.

A library can only be preloaded before the process starts: ``moeserve``'s command re-executes itself once with
``preload_env()`` (``reexec_with_jemalloc``), and the processes it starts inherit the environment. The price
is that a process keeps the peak of what it allocated until it exits. ``MOESERVE_CPU_ALLOCATOR=system`` keeps
glibc's malloc; ``MOESERVE_JEMALLOC`` names the library where it is not in the linker's usual places
(Debian/Ubuntu: ``apt-get install libjemalloc2``).
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


def find_jemalloc(environ: Mapping[str, str] | None = None) -> str | None:
    """The path of libjemalloc's shared library (``MOESERVE_JEMALLOC`` in ``environ``, default this process's
    environment, else the linker's usual places), or None."""
    named = (os.environ if environ is None else environ).get("MOESERVE_JEMALLOC")
    if named:
        return named if Path(named).is_file() else None
    for d in _DIRS:
        for name in ("libjemalloc.so.2", "libjemalloc.so"):
            if (Path(d) / name).is_file():
                return str(Path(d) / name)
    found = ctypes.util.find_library("jemalloc")
    return found if found and Path(found).is_absolute() else None


def preloaded_by(ld_preload: str) -> str | None:
    """The allocator (``jemalloc`` / ``tcmalloc``) that an ``LD_PRELOAD`` value preloads, or None."""
    return next((name for name in _ALLOCATORS if name in ld_preload), None)


def preloaded() -> str | None:
    """The allocator preloaded into this process (``jemalloc`` / ``tcmalloc``), or None for the system's."""
    return preloaded_by(os.environ.get("LD_PRELOAD", ""))


def in_use() -> str:
    """The malloc this process runs on, from the libraries mapped into it: jemalloc, tcmalloc or system."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in _ALLOCATORS if f"lib{name}" in maps), "system")


def describe() -> str:
    """One line for ``moeserve check``: what a CPU engine started by the ``moeserve`` command runs on."""
    if os.environ.get("MOESERVE_CPU_ALLOCATOR", "jemalloc") == "system":
        return "system malloc (MOESERVE_CPU_ALLOCATOR=system)"
    if preloaded():
        return f"{preloaded()} (preloaded by the environment)"
    lib = find_jemalloc()
    if lib is None:
        return ("system malloc: jemalloc not found (apt-get install libjemalloc2, or MOESERVE_JEMALLOC=path); "
                "CPU steps page-fault their large buffers in afresh")
    return f"jemalloc for CPU engines ({lib})"


def preload_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables to add to ``environ`` (default: this process's) so that a process started with them runs
    on jemalloc: empty where it is turned off, already preloaded (jemalloc or tcmalloc), or not installed."""
    env = os.environ if environ is None else environ
    text = env.get("LD_PRELOAD", "")
    if env.get("MOESERVE_CPU_ALLOCATOR", "jemalloc") == "system" or preloaded_by(text) or sys.platform != "linux":
        return {}
    lib = find_jemalloc(env)
    if lib is None:
        return {}
    conf = env.get("MALLOC_CONF")
    return {"LD_PRELOAD": f"{lib}:{text}" if text else lib, "MALLOC_CONF": conf or MALLOC_CONF, _DONE: "1"}


def reexec_with_jemalloc(argv: list[str]) -> None:
    """Replace this process by ``python -m moeserve.launch.cli *argv`` on jemalloc, where ``preload_env``
    offers it and this process is not already such a one; returns only where it does not."""
    if os.environ.get(_DONE):
        return
    extra = preload_env()
    if not extra:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "moeserve.launch.cli", *argv], {**os.environ, **extra})
