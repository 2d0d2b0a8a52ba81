"""The serving dtypes by the names every layer uses (``--dtype``, worker specs, wire messages).

The lowest layer of the package: it imports only torch, so ``comm/``, ``stages/`` and ``coordinator/`` all
take the one table from here.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def serving_dtype(dtype: str, device: str) -> torch.dtype:
    """The dtype a run uses for weights and cache: ``dtype`` from the table, or for ``"auto"`` float32 on the
    CPU and bfloat16 on accelerators (``device``: cpu, cuda[:N], npu[:N]). One rule for engines and plans."""
    if dtype == "auto":
        return torch.float32 if device.split(":")[0] == "cpu" else torch.bfloat16
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The table's name of ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``); ValueError for another dtype."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"{dtype} is not a serving dtype (supported: {sorted(DTYPES)})")
