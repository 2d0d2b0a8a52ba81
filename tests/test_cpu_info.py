"""CPU reports: /proc/cpuinfo of each CPU kind the project meets, and ``moeserve check``'s rows."""

from __future__ import annotations

import subprocess
import sys

from moeserve.model.cpu_info import cpu_info, matmul_path, parse_cpuinfo

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
