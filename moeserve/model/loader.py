"""Checkpoint loading from a local Hugging Face-layout directory.

Tensors are read one at a time with plain reads (no memory map, see safetensors_io), only those the
caller's model slice asks for, and copied straight into the preallocated parameters; FP8 weights (``float8_e4m3fn`` with a
``weight_scale_inv`` per block, as DeepSeek-V3 ships them) are dequantized on the way.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel, ModelSlice
from moeserve.model.safetensors_io import SafetensorsError, SafetensorsFile
from moeserve.model.weights import WeightSpec, weight_specs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP8_DTYPES = (torch.float8_e4m3fn,)


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, malformed, or does not match its config."""


class Checkpoint:
    """The tensor index of a checkpoint directory: which file holds which tensor name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory")
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} is not a checkpoint: config.json is missing")
        self.weight_map = self._read_index()

    def _read_index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            for file in sorted(set(weight_map.values())):
                if not (self.path / file).is_file():
                    raise CheckpointError(f"{index} lists {file}, which does not exist")
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if single.is_file():
            try:
                with SafetensorsFile(single) as f:
                    return {name: SINGLE_FILE for name in f.keys()}
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from e
        raise CheckpointError(f"{self.path} is not a checkpoint: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.path)

    def fingerprint(self) -> str:
        """A hash of config.json and the tensor index: equal on every node that sees the same checkpoint."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        h.update(json.dumps(sorted(self.weight_map.items())).encode())
        return h.hexdigest()[:16]

    def total_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.weight_map.values()))


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """weight: [out, in] float8 with scale_inv: [ceil(out/bo), ceil(in/bi)] -> [out, in] in ``dtype``."""
    out_dim, in_dim = weight.shape
    bo, bi = block
    expected = (-(-out_dim // bo), -(-in_dim // bi))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected}")
    scale = scale_inv.float().repeat_interleave(bo, 0)[:out_dim].repeat_interleave(bi, 1)[:, :in_dim]
    return (weight.float() * scale).to(dtype)


class _Reader:
    """Opens each shard once and reads single tensors (dequantizing FP8) on demand."""

    def __init__(self, ckpt: Checkpoint, stack: ExitStack, block: tuple[int, int] | None):
        self.ckpt, self.stack, self.block = ckpt, stack, block
        self.handles: dict[str, SafetensorsFile] = {}

    def has(self, name: str) -> bool:
        return name in self.ckpt.weight_map

    def _handle(self, name: str):
        file = self.ckpt.weight_map[name]
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(SafetensorsFile(self.ckpt.path / file))
        return self.handles[file]

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        tensor = self._handle(name).get_tensor(name)
        if tensor.dtype in FP8_DTYPES:
            scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
            if not self.has(scale_name):
                raise CheckpointError(f"tensor {name} is float8 but {scale_name} is missing")
            tensor = dequantize_fp8(tensor, self._handle(scale_name).get_tensor(scale_name),
                                    self.block or (128, 128), dtype)
        return tensor


def _read_spec(reader: _Reader, spec: WeightSpec) -> torch.Tensor:
    dtype = spec.target.dtype
    if reader.has(spec.name):
        tensor = reader.read(spec.name, dtype)
        where = spec.name
    else:
        alt = next(((n, i, lo, hi) for n, i, lo, hi in spec.alternatives if reader.has(n)), None)
        if alt is None:
            raise CheckpointError(f"checkpoint is missing tensor {spec.name} (expected shape {list(spec.shape)})")
        name, index, lo, hi = alt
        tensor = reader.read(name, dtype)[index, lo:hi]
        where = f"{name}[{index}, {lo}:{hi}]"
    if tuple(tensor.shape) != spec.shape:
        raise CheckpointError(f"tensor {where} has shape {list(tensor.shape)}, expected {list(spec.shape)}")
    return spec.take(tensor)


def load_weights(model: DeepseekModel, ckpt: Checkpoint, progress: bool = False) -> int:
    """Fill every parameter of ``model`` (a slice) from ``ckpt``; returns the bytes copied in."""
    specs = weight_specs(model)
    by_file: dict[str, list[WeightSpec]] = defaultdict(list)
    for spec in specs:
        by_file[ckpt.weight_map.get(spec.name, "")].append(spec)  # group reads by shard
    loaded = 0
    bar = tqdm(total=len(specs), desc="loading weights", unit="tensor", disable=not progress)
    with ExitStack() as stack, torch.no_grad():
        reader = _Reader(ckpt, stack, model.config.quant_block_size)
        for file in sorted(by_file):
            for spec in by_file[file]:
                spec.target.copy_(_read_spec(reader, spec))
                loaded += spec.target.numel() * spec.target.element_size()
                bar.update(1)
    bar.close()
    return loaded


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               model_slice: ModelSlice | None = None, progress: bool = False,
               max_positions: int | None = None) -> DeepseekModel:
    """Build the (sliced) model on ``device`` and load its weights from the checkpoint at ``path``."""
    ckpt = Checkpoint(path)
    config = ckpt.config()
    with torch.device(device):
        model = DeepseekModel(config, model_slice, dtype=dtype, max_positions=max_positions)
    load_weights(model, ckpt, progress=progress)
    return model.eval().requires_grad_(False)
