"""Checkpoint loading from a local Hugging Face-layout directory (or dummy weights from config.json alone).

Tensors are read one at a time with plain reads (no memory map, see safetensors_io), only those the
caller's model slice asks for, and copied straight into the preallocated parameters. FP8 weights
(``float8_e4m3fn`` with a ``weight_scale_inv`` per block, as DeepSeek-V3 ships them) are dequantized on the
way, except where the model keeps them in float8 (``keep_fp8``): then weight and scales are copied as stored.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from moeserve.errors import UserError
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel, ModelSlice
from moeserve.model.dummy import DummyReader
from moeserve.model.fp8 import dequantize_into
from moeserve.model.safetensors_io import SafetensorsError, SafetensorsFile
from moeserve.model.weights import WeightSpec, weight_specs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP8_DTYPES = (torch.float8_e4m3fn,)
LOAD_FORMATS = ("auto", "dummy")


class CheckpointError(UserError, ValueError):
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
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    try:
        return dequantize_into(out, weight, scale_inv.float(), block)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


class TensorSource(Protocol):
    """Where weights come from: a checkpoint on disk (``_Reader``) or generated ones (``dummy.DummyReader``)."""

    def has(self, name: str) -> bool: ...

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The full tensor ``name``; a float8 one is dequantized to ``dtype``."""
        ...

    def read_fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The full float8 tensor ``name`` as stored, and its float32 ``weight_scale_inv``."""
        ...


class _Reader:
    """Opens each shard once and reads single tensors (dequantizing FP8) on demand."""

    def __init__(self, ckpt: Checkpoint, stack: ExitStack, block: tuple[int, int] | None):
        self.ckpt, self.stack, self.block = ckpt, stack, block
        self.handles: dict[str, SafetensorsFile] = {}

    def has(self, name: str) -> bool:
        return name in self.ckpt.weight_map

    def _get(self, name: str) -> torch.Tensor:
        file = self.ckpt.weight_map[name]
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(SafetensorsFile(self.ckpt.path / file))
        return self.handles[file].get_tensor(name)

    def _scale(self, name: str) -> torch.Tensor:
        scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
        if not self.has(scale_name):
            raise CheckpointError(f"tensor {name} is float8 but {scale_name} is missing")
        return self._get(scale_name)

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        tensor = self._get(name)
        if tensor.dtype in FP8_DTYPES:
            tensor = dequantize_fp8(tensor, self._scale(name), self.block or (128, 128), dtype)
        return tensor

    def read_fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = self._get(name)
        if tensor.dtype not in FP8_DTYPES:
            raise CheckpointError(f"tensor {name} is {tensor.dtype}, but the model keeps it in float8 (config.json "
                                  "has an FP8 quantization_config); load it with keep_fp8=False")
        return tensor, self._scale(name).float()


def _check_shape(where: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"tensor {where} has shape {list(tensor.shape)}, expected {list(shape)}")


def _read_fp8_spec(reader: TensorSource, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if not reader.has(spec.name):
        raise CheckpointError(f"checkpoint is missing tensor {spec.name} (expected shape {list(spec.shape)}, "
                              "float8 with block scales)")
    weight, scale = reader.read_fp8(spec.name)
    _check_shape(spec.name, weight, spec.shape)
    _check_shape(spec.name.removesuffix(".weight") + ".weight_scale_inv", scale, spec.scale_shape)
    return spec.take(weight), spec.take(scale)


def _read_spec(reader: TensorSource, spec: WeightSpec) -> torch.Tensor:
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
    _check_shape(where, tensor, spec.shape)
    return spec.take(tensor)


def fill_weights(specs: list[WeightSpec], reader: TensorSource, progress: bool = False) -> int:
    """Copy every spec's share from ``reader`` into its target (and its scales, for float8 targets), in the
    order given; returns the bytes copied in."""
    loaded = 0
    with torch.no_grad():
        for spec in tqdm(specs, desc="loading weights", unit="tensor", disable=not progress):
            if spec.scale_target is None:
                spec.target.copy_(_read_spec(reader, spec))
            else:
                weight, scale = _read_fp8_spec(reader, spec)
                spec.target.copy_(weight)
                spec.scale_target.copy_(scale)
                loaded += spec.scale_target.numel() * spec.scale_target.element_size()
            loaded += spec.target.numel() * spec.target.element_size()
    return loaded


def load_weights(model: DeepseekModel, ckpt: Checkpoint, progress: bool = False) -> int:
    """Fill every parameter of ``model`` (a slice) from ``ckpt``; returns the bytes copied in."""
    specs = weight_specs(model)
    by_file: dict[str, list[WeightSpec]] = defaultdict(list)
    for spec in specs:
        by_file[ckpt.weight_map.get(spec.name, "")].append(spec)  # group reads by shard
    ordered = [spec for file in sorted(by_file) for spec in by_file[file]]
    with ExitStack() as stack:
        return fill_weights(ordered, _Reader(ckpt, stack, model.config.quant_block_size), progress)


def load_dummy_weights(model: DeepseekModel, seed: int = 0, progress: bool = False) -> int:
    """Fill every parameter of ``model`` (a slice) with dummy weights made on its device; returns the bytes set."""
    specs = weight_specs(model)
    shapes = {spec.name: spec.shape for spec in specs}
    device = next(model.parameters()).device
    stored = getattr(torch, model.config.torch_dtype, torch.float32)
    stored = stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32
    return fill_weights(specs, DummyReader(shapes, model.config.quant_block_size, device, seed, stored), progress)


class MTPError(UserError, ValueError):
    """Speculative decoding by MTP asked of a model that has no MTP module."""


def check_mtp(config: ModelConfig, ckpt: Checkpoint | None) -> None:
    """MTPError (one line) unless the model's config and, if given, checkpoint hold an MTP module."""
    if config.num_nextn_predict_layers < 1:
        raise MTPError("--speculative-config method 'mtp' needs a model with a multi-token-prediction module; "
                       "this one has none (config.json: num_nextn_predict_layers is 0 or missing)")
    name = f"model.layers.{config.mtp_layer_id}.eh_proj.weight"
    if ckpt is not None and name not in ckpt.weight_map:
        raise MTPError(f"--speculative-config method 'mtp' needs the MTP module's tensors, but the checkpoint "
                       f"at {ckpt.path} has no {name} (config.json says num_nextn_predict_layers = "
                       f"{config.num_nextn_predict_layers})")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               model_slice: ModelSlice | None = None, progress: bool = False,
               max_positions: int | None = None, *, load_format: str = "auto", keep_fp8: bool = False,
               dummy_seed: int = 0, with_mtp: bool = False) -> DeepseekModel:
    """Build the (sliced) model on ``device`` and fill its weights.

    ``load_format``: "auto" reads the checkpoint at ``path``; "dummy" needs only ``path``/config.json and
    generates the weights on ``device`` from ``dummy_seed`` (see ``dummy.py``). ``keep_fp8``: with an FP8
    block-scaled config, hold the routed experts in float8 and dequantize them one layer at a time at compute
    (otherwise every float8 tensor is dequantized to ``dtype`` on load). ``with_mtp``: the slice with the LM
    head also loads the multi-token-prediction module (MTPError if the model has none).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    ckpt = Checkpoint(path) if load_format == "auto" else None
    config = ckpt.config() if ckpt is not None else ModelConfig.from_hf(path)
    if with_mtp:
        check_mtp(config, ckpt)
    with torch.device(device):
        model = DeepseekModel(config, model_slice, dtype=dtype, max_positions=max_positions, keep_fp8=keep_fp8,
                              with_mtp=with_mtp)
    if ckpt is None:
        load_dummy_weights(model, seed=dummy_seed, progress=progress)
    else:
        load_weights(model, ckpt, progress=progress)
    return model.eval().requires_grad_(False)
