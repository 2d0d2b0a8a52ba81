"""Reading single tensors from a .safetensors file with plain reads, not a memory map.

A memory-mapped read leaves every page it touched resident in the process, so loading a slice of a large
checkpoint would grow the resident size by all the bytes read. Here each tensor is read with ``readinto``
straight into its own buffer, so the resident size stays near what the caller keeps.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsError(ValueError):
    """A file that is not valid safetensors."""


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        try:
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(header_len))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            self._file.close()
            raise SafetensorsError(f"{self.path}: not a safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries: dict[str, dict] = header

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=dtype)
        if tensor.numel() * tensor.element_size() != end - start:
            raise SafetensorsError(f"{self.path}: tensor {name} has {end - start} bytes for shape {entry['shape']}")
        if end > start:
            self._file.seek(self._data_start + start)
            buf = tensor.view(-1).view(torch.uint8).numpy()
            if self._file.readinto(buf) != end - start:  # type: ignore[arg-type]
                raise SafetensorsError(f"{self.path}: tensor {name} is truncated")
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
