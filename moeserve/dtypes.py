"""The serving dtypes by the names every layer uses (``--dtype``, worker specs, wire messages).

The lowest layer of the package: it imports only torch, so ``comm/``, ``stages/`` and ``coordinator/`` all
take the one table from here.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The table's name of ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``); ValueError for another dtype."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"{dtype} is not a serving dtype (supported: {sorted(DTYPES)})")
