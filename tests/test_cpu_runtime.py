"""jemalloc and Intel OpenMP for CPU engines (moeserve/cpu_runtime.py): when each is preloaded, and that the
``moeserve`` command really runs on them (the libraries mapped into the process), with the same tokens as
glibc's malloc and GNU OpenMP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeserve import cpu_runtime


def test_preload_env_rules(tmp_path: Path) -> None:
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    iomp = tmp_path / "libiomp5.so"
    iomp.write_bytes(b"")
    no_iomp = {"MOESERVE_IOMP": str(tmp_path / "missing.so")}
    base = {"MOESERVE_JEMALLOC": str(lib)} | no_iomp
    env = cpu_runtime.preload_env(base)
    assert env["LD_PRELOAD"] == str(lib) and env["MALLOC_CONF"] == cpu_runtime.MALLOC_CONF
    kept = cpu_runtime.preload_env(base | {"LD_PRELOAD": "/x/libfoo.so", "MALLOC_CONF": "narenas:2"})
    assert kept["LD_PRELOAD"] == f"{lib}:/x/libfoo.so" and kept["MALLOC_CONF"] == "narenas:2"
    assert cpu_runtime.preload_env(base | {"MOESERVE_CPU_ALLOCATOR": "system"}) == {}
    assert cpu_runtime.preload_env(base | {"LD_PRELOAD": "/opt/libtcmalloc_minimal.so.4"}) == {}
    assert cpu_runtime.preload_env({"MOESERVE_JEMALLOC": str(tmp_path / "missing.so")} | no_iomp) == {}
    assert cpu_runtime.preloaded_by("/x/libfoo.so:/opt/libtcmalloc_minimal.so.4") == "tcmalloc"
    assert cpu_runtime.preloaded_by(str(lib)) == "jemalloc" and cpu_runtime.preloaded_by("/x/libfoo.so") is None
    # Intel OpenMP beside jemalloc; alone where the allocator is turned off or already preloaded; never twice
    both = base | {"MOESERVE_IOMP": str(iomp)}
    assert cpu_runtime.preload_env(both)["LD_PRELOAD"] == f"{lib}:{iomp}"
    alone = cpu_runtime.preload_env(both | {"MOESERVE_CPU_ALLOCATOR": "system"})
    assert alone["LD_PRELOAD"] == str(iomp) and "MALLOC_CONF" not in alone
    assert cpu_runtime.preload_env(both | {"LD_PRELOAD": "/opt/libtcmalloc_minimal.so.4"})["LD_PRELOAD"] == \
        f"{iomp}:/opt/libtcmalloc_minimal.so.4"
    assert cpu_runtime.preload_env(both | {"MOESERVE_CPU_OPENMP": "gnu"})["LD_PRELOAD"] == str(lib)
    assert cpu_runtime.preload_env(both | {"LD_PRELOAD": str(iomp), "MOESERVE_CPU_ALLOCATOR": "system"}) == {}


def generate(extra_env: dict[str, str]) -> tuple[list[int], str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "MOESERVE_ALLOCATOR_SET")}
    proc = subprocess.run([sys.executable, "-m", "moeserve.launch.cli", "-v", "generate", "--temperature", "0",
                           "--max-tokens", "8", "--ignore-eos", "--json", "def fib(n):"],
                          capture_output=True, text=True, timeout=300, env=env | extra_env)
    assert proc.returncode == 0, proc.stderr
    line = [line for line in proc.stderr.splitlines() if "CPU malloc: " in line][-1]
    malloc, openmp = line.split("CPU malloc: ")[1].split("; CPU OpenMP: ")
    return json.loads(proc.stdout.splitlines()[-1])["token_ids"], malloc, openmp


def test_cli_runs_cpu_engine_on_jemalloc_and_intel_openmp() -> None:
    have_jemalloc, have_iomp = cpu_runtime.find_jemalloc() is not None, cpu_runtime.find_iomp() is not None
    if not (have_jemalloc or have_iomp):
        pytest.skip("neither libjemalloc (Debian: libjemalloc2; scripts/test_services.sh installs it as root) nor "
                    "libiomp5 (pip install intel-openmp: the cpu extra) is installed")
    ids, malloc, openmp = generate({})
    assert (malloc, openmp) == ("jemalloc" if have_jemalloc else "system", "intel" if have_iomp else "gnu")
    ids_plain, malloc_plain, openmp_plain = generate({"MOESERVE_CPU_ALLOCATOR": "system", "MOESERVE_CPU_OPENMP": "gnu"})
    assert (malloc_plain, openmp_plain) == ("system", "gnu")
    assert ids == ids_plain and len(ids) == 8


def test_shared_cores_env() -> None:
    """Intel OpenMP's threads spin 1 ms, not 200, where several engine processes share the cores; one process,
    or a KMP_BLOCKTIME the user set, is left alone."""
    assert cpu_runtime.shared_cores_env({}, 2) == {"KMP_BLOCKTIME": "1"}
    assert cpu_runtime.shared_cores_env({}, 1) == {}
    assert cpu_runtime.shared_cores_env({"KMP_BLOCKTIME": "50"}, 4) == {}
