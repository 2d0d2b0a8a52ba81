"""CPU reports: /proc/cpuinfo of each CPU kind the project meets, and ``moeserve check``'s rows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moeserve.model.cpu_info import (
    cpu_info,
    matmul_path,
    numa_nodes,
    parse_cpuinfo,
    parse_lscpu_nodes,
    rank_cpus,
)

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8

processor\t: 1
model name\t: something else
"""
EPYC = """processor\t: 0
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse avx2 avx512f avx512_bf16
"""
KUNPENG = """processor\t: 0
BogoMIPS\t: 200.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm dcpop
CPU implementer\t: 0x48
CPU part\t: 0xd01
"""


def test_x86_with_amx() -> None:
    info = parse_cpuinfo(XEON_AMX, "x86_64")
    assert info.model == "Intel(R) Xeon(R) Platinum 8480+" and info.has_amx
    assert info.flags == ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    assert info.isa("bfloat16") == "AMX (bf16 tiles)" and info.isa("float32") == "AVX-512"


def test_x86_without_amx() -> None:
    info = parse_cpuinfo(EPYC, "x86_64")
    assert not info.has_amx and info.isa("bfloat16") == "AVX-512 with bf16 dot products"


def test_arm() -> None:
    info = parse_cpuinfo(KUNPENG, "aarch64")
    assert info.model == "ARM implementer 0x48 part 0xd01"
    assert info.flags == ("asimd", "asimdhp") and info.isa() == "NEON"
    assert "F.linear" in matmul_path(info, "float32")


def test_check_reports_the_cpu() -> None:
    out = subprocess.run([sys.executable, "-m", "moeserve.launch.cli", "check"], capture_output=True, text=True,
                         timeout=120).stdout
    info = cpu_info()
    rows = dict(line.split(None, 1) if not line.startswith("cpu ") else line.split("  ", 1)
                for line in out.splitlines() if line.strip())
    assert rows["cpu"].strip().startswith(info.model)
    assert "bfloat16: " in rows["cpu matmul"] and "float32: " in rows["cpu matmul"]
    from moeserve.kernels.cpu_build import amx_tiles, load_error

    # the C++ kernels: which run where they built, else the reason
    kernels = rows["cpu kernels"].strip()
    assert kernels.startswith("bfloat16: " if load_error() is None else "off (")
    # the kernels listed (before any parenthesis, which may say why the MoE experts stay eager)
    assert ("MoE experts" in kernels.split(" (")[0]) == amx_tiles()


# ----------------------------------------------------------------------------- NUMA nodes and binding

# `lscpu --parse=CPU,NODE` of a two-socket host whose nodes interleave their CPU numbers (as many do)
TWO_NODES = """# The following is the parsable format, which can be fed to other
# programs. Each different item in every column has an unique ID
# starting usually from zero.
# CPU,Node
0,0
1,1
2,0
3,1
4,0
5,1
6,0
7,1
"""
NO_NUMA = "# CPU,Node\n0,\n1,\n"


def test_parse_lscpu_nodes() -> None:
    assert parse_lscpu_nodes(TWO_NODES) == {0: (0, 2, 4, 6), 1: (1, 3, 5, 7)}
    assert parse_lscpu_nodes(NO_NUMA) == {0: (0, 1)}


def test_rank_cpus_keep_each_rank_on_one_node() -> None:
    nodes = parse_lscpu_nodes(TWO_NODES)
    assert [rank_cpus(nodes, r, 2) for r in range(2)] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    four = [rank_cpus(nodes, r, 4) for r in range(4)]
    assert four == [(0, 2), (1, 3), (4, 6), (5, 7)]
    three = [rank_cpus(nodes, r, 3) for r in range(3)]  # node 0 holds ranks 0 and 2, node 1 rank 1
    assert three == [(0, 2), (1, 3, 5, 7), (4, 6)]
    assert rank_cpus({0: (0, 1)}, 2, 3) == (0,)  # more ranks than CPUs: one CPU each, shared
    with pytest.raises(ValueError):
        rank_cpus(nodes, 4, 4)


def test_numa_nodes_of_this_machine_cover_its_cpus() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    nodes = numa_nodes()
    assert sorted(c for cpus in nodes.values() for c in cpus) == allowed
    first = allowed[0]
    node = next(n for n, cpus in nodes.items() if first in cpus)
    assert numa_nodes(allowed={first}) == {node: (first,)}  # nodes keep only the CPUs allowed
