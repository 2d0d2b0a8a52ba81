"""Backend selection by device type, and a static check that generic code names no CUDA-only call.

The device always comes from config (``--device cpu|cuda|npu``); a stray ``torch.cuda.`` or ``"nccl"`` in a
code path that every device runs is what breaks Ascend NPUs first, and there is no NPU in CI to notice.
"""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from moeserve.comm.groups import backend_for

PACKAGE = Path(__file__).resolve().parent.parent / "moeserve"


# ---- backend_for ----

def test_backend_per_device_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # any import of torch_npu would now fail
    assert backend_for("cpu") == "gloo"
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for("cuda") == "nccl"
    assert backend_for("cuda:1") == "nccl"
    assert backend_for(torch.device("cuda", 1)) == "nccl"


def test_npu_imports_torch_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    assert backend_for("npu") == "hccl"
    assert backend_for("npu:3") == "hccl"  # parsed here: torch rejects "npu" until torch_npu registers it


def test_npu_without_torch_npu_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(ImportError, match=r"torch_npu.*moeserve\[npu\]"):
        backend_for("npu:0")


@pytest.mark.parametrize("device", ["xpu", "mps", "tpu:0", "", torch.device("meta")])
def test_unknown_device_type_raises(device: str | torch.device) -> None:
    with pytest.raises(ValueError, match="no distributed backend.*supported"):
        backend_for(device)


# ---- no CUDA-only call on the generic path ----

# (file under moeserve/, what it names) -> why that is allowed there. Everything else must stay device-generic.
ALLOWED = {
    ("comm/groups.py", '"cuda"'): "the one device-type -> backend table (BACKENDS)",
    ("comm/groups.py", "nccl"): "the one device-type -> backend table (BACKENDS)",
    ("coordinator/config.py", '"cuda"'): "validates --device against the device types moeserve supports",
    ("kvstore/latent_cache.py", '"cuda"'): "free-memory query, one branch per device type (npu has its own)",
    ("kvstore/latent_cache.py", "torch.cuda."): "free-memory query, one branch per device type (npu has its own)",
    ("device_copy.py", '"cuda"'): "pinned non-blocking copies and events on CUDA; other devices copy plainly",
    ("device_copy.py", "torch.cuda."): "pinned non-blocking copies and events on CUDA; other devices copy plainly",
    ("launch/cmd_bench.py", '"cuda"'): "peak device memory of the benchmark, guarded by device type",
    ("launch/cmd_bench.py", "torch.cuda."): "peak device memory of the benchmark, guarded by device type",
    ("launch/cmd_check.py", '"cuda"'): "`moeserve check` reports what this machine has, CUDA included",
    ("launch/cmd_check.py", "torch.cuda."): "`moeserve check` reports what this machine has, CUDA included",
    ("launch/cmd_check.py", "nccl"): "`moeserve check` lists the available collective backends",
    ("experts/expert_compute.py", ".is_cuda"): "torch._grouped_mm is a CUDA kernel; other devices take the per-expert loop",
    ("launch/preflight.py", '"cuda"'): "the preflight checks that the asked-for device exists, per device type",
    ("launch/preflight.py", "torch.cuda."): "the preflight checks that the asked-for device exists, per device type",
    ("kernels/__init__.py", '"cuda"'): "the Triton kernels run on CUDA devices only (kernels_apply decides)",
    ("kernels/pdl.py", '"cuda"'): "programmatic dependent launch is a CUDA launch attribute (sm_90 and later)",
    ("kernels/pdl.py", "torch.cuda."): "the device's compute capability decides whether its launches take PDL",
    ("stages/cuda_graph.py", "torch.cuda."): "CUDA graphs: built only for CUDA devices (ModelRunner guards)",
    ("stages/warm_up.py", '"cuda"'): "the warm-up waits for the device where it is a CUDA one",
    ("stages/warm_up.py", "torch.cuda."): "the warm-up waits for the device where it is a CUDA one",
    ("stages/runner.py", '"cuda"'): "CUDA graphs are captured on CUDA devices only",
    ("coordinator/ray_cluster.py", '"cuda"'): "the one device-type -> Ray resource table (RAY_ACCELERATORS)",
}

CUDA_LITERAL = re.compile(r"cuda(:\d+)?")
NCCL = re.compile(r"(?<![a-z])nccl(?![a-z])", re.IGNORECASE)  # is_nccl_available, not AsyncClient


def docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings or bare string statements (prose, not code)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


def cuda_only_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for each CUDA-only name in code: ``torch.cuda.``, ``.cuda(``, ``.is_cuda``, a "cuda"
    device literal, or nccl as a name or the backend string. Comments and docstrings are prose and not looked at."""
    tree = ast.parse(source)
    prose = docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute):
            if node.attr == "cuda" and isinstance(node.value, ast.Name) and node.value.id == "torch":
                found.append((line, "torch.cuda."))
            elif node.attr == "is_cuda":
                found.append((line, ".is_cuda"))
            if NCCL.search(node.attr):
                found.append((line, "nccl"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            found.append((line, ".cuda("))
        elif isinstance(node, ast.Name) and NCCL.search(node.id):
            found.append((line, "nccl"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            if CUDA_LITERAL.fullmatch(node.value):
                found.append((line, '"cuda"'))
            if node.value.lower() == "nccl":  # the backend name; NCCL_* env variable names are config
                found.append((line, "nccl"))
    return sorted(set(found))


def scan_package() -> dict[tuple[str, str], list[int]]:
    hits: dict[tuple[str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, what in cuda_only_uses(path.read_text()):
            hits.setdefault((rel, what), []).append(line)
    return hits


def test_scanner_sees_each_kind_and_skips_prose() -> None:
    code = '''"""Docstring naming torch.cuda. and NCCL is prose."""
import torch
# torch.cuda.synchronize() in a comment is prose too
a = torch.cuda.is_available()
b = x.cuda()
c = y.is_cuda
d = torch.device("cuda:0")
e = {"cuda": "nccl"}
f = dist.is_nccl_available()
g = "cudagraph"  # not a device literal
h = AsyncClient()  # not nccl
env["NCCL_IB_HCA"] = hca  # configures NCCL where it runs, calls nothing
'''
    assert cuda_only_uses(code) == [(4, "torch.cuda."), (5, ".cuda("), (6, ".is_cuda"), (7, '"cuda"'),
                                    (8, '"cuda"'), (8, "nccl"), (9, "nccl")]


def test_generic_code_names_no_cuda_only_call() -> None:
    hits = scan_package()
    unexpected = {key: lines for key, lines in hits.items() if key not in ALLOWED}
    assert not unexpected, (
        "CUDA-only names on a device-generic path (take the device from config, or guard the branch by "
        "device type and add it to ALLOWED with the reason): "
        + "; ".join(f"moeserve/{path}:{','.join(map(str, lines))} {what}" for (path, what), lines in unexpected.items()))


def test_allowed_exceptions_are_still_needed() -> None:
    stale = sorted(set(ALLOWED) - set(scan_package()))
    assert not stale, f"ALLOWED lists exceptions the code no longer needs; remove them: {stale}"
