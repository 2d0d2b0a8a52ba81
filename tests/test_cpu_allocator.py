"""jemalloc for CPU engines (moeserve/cpu_allocator.py): when it is preloaded, and that the ``moeserve``
command really runs on it (the libraries mapped into the process), with the same tokens as glibc's malloc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeserve import cpu_allocator


def test_preload_env_rules(tmp_path: Path) -> None:
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    base = {"MOESERVE_JEMALLOC": str(lib)}
    env = cpu_allocator.preload_env(base)
    assert env["LD_PRELOAD"] == str(lib) and env["MALLOC_CONF"] == cpu_allocator.MALLOC_CONF
    kept = cpu_allocator.preload_env(base | {"LD_PRELOAD": "/x/libfoo.so", "MALLOC_CONF": "narenas:2"})
    assert kept["LD_PRELOAD"] == f"{lib}:/x/libfoo.so" and kept["MALLOC_CONF"] == "narenas:2"
    assert cpu_allocator.preload_env(base | {"MOESERVE_CPU_ALLOCATOR": "system"}) == {}
    assert cpu_allocator.preload_env(base | {"LD_PRELOAD": "/opt/libtcmalloc_minimal.so.4"}) == {}
    assert cpu_allocator.preload_env({"MOESERVE_JEMALLOC": str(tmp_path / "missing.so")}) == {}
    assert cpu_allocator.preloaded_by("/x/libfoo.so:/opt/libtcmalloc_minimal.so.4") == "tcmalloc"
    assert cpu_allocator.preloaded_by(str(lib)) == "jemalloc" and cpu_allocator.preloaded_by("/x/libfoo.so") is None


def generate(extra_env: dict[str, str]) -> tuple[list[int], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "MOESERVE_ALLOCATOR_SET")}
    proc = subprocess.run([sys.executable, "-m", "moeserve.launch.cli", "-v", "generate", "--temperature", "0",
                           "--max-tokens", "8", "--ignore-eos", "--json", "def fib(n):"],
                          capture_output=True, text=True, timeout=300, env=env | extra_env)
    assert proc.returncode == 0, proc.stderr
    malloc = [line.split("CPU malloc: ")[1] for line in proc.stderr.splitlines() if "CPU malloc: " in line]
    return json.loads(proc.stdout.splitlines()[-1])["token_ids"], malloc[-1]


def test_cli_runs_cpu_engine_on_jemalloc() -> None:
    if cpu_allocator.find_jemalloc() is None:
        pytest.skip("libjemalloc not installed (Debian: libjemalloc2; scripts/test_services.sh installs it as root)")
    ids, malloc = generate({})
    assert malloc == "jemalloc"
    ids_system, malloc_system = generate({"MOESERVE_CPU_ALLOCATOR": "system"})
    assert malloc_system == "system"
    assert ids == ids_system and len(ids) == 8
