"""What the CPU offers the engine: model name, the instruction-set extensions that decide matmul speed, and
which matmul path moeserve takes on it (``moeserve check`` prints it; CPU benchmarks record it).

Read from ``/proc/cpuinfo`` (Linux on x86 and ARM); elsewhere only what ``platform`` says.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

# the flags that matter for bf16 / float32 matmuls, in the order they are shown
X86_FLAGS: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
ARM_FLAGS: tuple[str, ...] = ("asimd", "asimdhp", "bf16", "i8mm", "sve", "sve2")  # asimd is NEON


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    flags: tuple[str, ...]  # the matmul-relevant ones this CPU has (X86_FLAGS / ARM_FLAGS)

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags and "amx_tile" in self.flags

    def isa(self, dtype_name: str = "bfloat16") -> str:
        """The best matmul instruction set for ``dtype_name`` operands, in words."""
        bf16 = dtype_name == "bfloat16"
        if bf16 and self.has_amx:
            return "AMX (bf16 tiles)"
        if bf16 and "avx512_bf16" in self.flags:
            return "AVX-512 with bf16 dot products"
        if "avx512f" in self.flags:
            return "AVX-512" + (" (bf16 converted to float32)" if bf16 else "")
        if "avx2" in self.flags:
            return "AVX2"
        if "sve" in self.flags or "asimd" in self.flags:
            extras = [f for f in ("sve2", "sve", "bf16", "i8mm") if f in self.flags]
            return "NEON" + (" + " + ", ".join(extras) if extras else "")
        return "no SIMD extension reported"


def parse_cpuinfo(text: str, machine: str) -> CpuInfo:
    """``/proc/cpuinfo`` text (first processor's entries) -> CpuInfo. x86 lists ``flags``, ARM ``Features``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or fields.get("Model name") or fields.get("CPU part", "") or machine
    if "flags" in fields:
        have, known = set(fields["flags"].split()), X86_FLAGS
    else:
        have, known = set(fields.get("Features", "").split()), ARM_FLAGS
        if "CPU implementer" in fields and model == fields.get("CPU part"):
            model = f"ARM implementer {fields['CPU implementer']} part {fields['CPU part']}"
    return CpuInfo(model=model, arch=machine, flags=tuple(f for f in known if f in have))


def cpu_info() -> CpuInfo:
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.exists() else ""
    return parse_cpuinfo(text, platform.machine()) if text else \
        CpuInfo(platform.processor() or platform.machine(), platform.machine(), ())


def matmul_path(info: CpuInfo, dtype_name: str) -> str:
    """The linear-layer path the engine takes on this CPU for weights of ``dtype_name``."""
    import torch

    from moeserve.model.cpu_linear import AVAILABLE

    if dtype_name == "bfloat16" and AVAILABLE:
        return f"oneDNN with weights packed once (PackedLinear), {info.isa(dtype_name)}"
    backend = "oneDNN/MKL" if torch.backends.mkldnn.is_available() else "ATen"
    return f"F.linear through {backend}, {info.isa(dtype_name)}"


# ----------------------------------------------------------------------------- NUMA nodes and thread binding


def parse_lscpu_nodes(text: str) -> dict[int, tuple[int, ...]]:
    """``lscpu --parse=CPU,NODE`` output -> {node: its CPUs, ascending}. Comment lines start with ``#``; a CPU
    with no node (a machine without NUMA) counts as node 0."""
    nodes: dict[int, list[int]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cpu, _, node = line.partition(",")
        nodes.setdefault(int(node) if node.strip() else 0, []).append(int(cpu))
    return {n: tuple(sorted(cpus)) for n, cpus in sorted(nodes.items())}


def numa_nodes(allowed: set[int] | None = None) -> dict[int, tuple[int, ...]]:
    """This machine's NUMA nodes, each with the CPUs of it this process may run on (``allowed``: default its
    affinity); nodes left with none are dropped. One node holding every allowed CPU where ``lscpu`` is
    missing."""
    import os
    import subprocess

    allowed = set(os.sched_getaffinity(0)) if allowed is None else allowed
    try:
        text = subprocess.run(["lscpu", "--parse=CPU,NODE"], capture_output=True, text=True, check=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {0: tuple(sorted(allowed))}
    nodes = {n: tuple(c for c in cpus if c in allowed) for n, cpus in parse_lscpu_nodes(text).items()}
    return {n: cpus for n, cpus in nodes.items() if cpus} or {0: tuple(sorted(allowed))}


def rank_cpus(nodes: dict[int, tuple[int, ...]], local_rank: int, local_ranks: int) -> tuple[int, ...]:
    """The CPUs of one of ``local_ranks`` ranks on a machine: rank r goes to node r mod (number of nodes), and
    the ranks of a node split its CPUs into contiguous shares (the first ones one CPU larger when they do not
    divide evenly), so that no rank's threads and memory straddle two nodes. A node with fewer CPUs than
    ranks gives each rank one CPU (shared)."""
    if not 0 <= local_rank < local_ranks:
        raise ValueError(f"local rank {local_rank} is not in [0, {local_ranks})")
    order = sorted(nodes)
    node = order[local_rank % len(order)]
    cpus = nodes[node]
    sharing = len(range(local_rank % len(order), local_ranks, len(order)))  # ranks placed on this node
    index = local_rank // len(order)
    if sharing >= len(cpus):
        return (cpus[index % len(cpus)],)
    size, extra = divmod(len(cpus), sharing)
    start = index * size + min(index, extra)
    return cpus[start:start + size + (1 if index < extra else 0)]
