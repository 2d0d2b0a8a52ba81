"""Checks of a command's settings before anything heavy happens: the device, the model directory, the
tokenizer, the layout and expert placement, the ports. Each failure is a ``UserError`` whose message says what
is wrong and what to do; the ``moeserve`` command prints it as one line and exits 1 (``-v``: with the
traceback). They read only small files (config.json, safetensors headers, the placement file), so a wrong
argument is reported in about a second, before any weight is loaded or any worker is spawned.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeserve.coordinator.config import EngineConfig
from moeserve.errors import UserError
from moeserve.kvstore.latent_cache import blocks_in_budget
from moeserve.model.config import ModelConfig

if TYPE_CHECKING:
    from moeserve.coordinator.plan import ParallelPlan

TOKENIZER_FILE = "tokenizer.json"


def check_engine(config: EngineConfig, need_tokenizer: bool = True, local_ranks: int | None = None) -> ModelConfig:
    """Everything an engine of ``config`` needs, checked without loading it; returns the model's config.

    ``local_ranks``: the ranks that run on this machine (default: pp x tp with the mp backend; 1 in one
    process, or with Ray, which places the ranks and needs only the coordinator's device here), each of
    which takes its own accelerator."""
    check_executor_backend(config)
    here = config.pp * config.tp if config.distributed_executor_backend == "mp" else 1
    check_device(config.device, local_ranks if local_ranks is not None else here)
    model_config = check_model_dir(config.model_path, config.load_format)
    if need_tokenizer and not config.skip_tokenizer_init:
        check_tokenizer(config.model_path)
    config.context_length(model_config)  # ContextLengthError: a --max-model-len past the model's positions
    check_kv_cache(config, check_layout(config, model_config))
    return model_config


def check_executor_backend(config: EngineConfig) -> None:
    """``--distributed-executor-backend ray`` needs Ray installed (the optional extra), and several ranks."""
    if config.distributed_executor_backend != "ray":
        return
    if importlib.util.find_spec("ray") is None:
        raise UserError("--distributed-executor-backend ray needs Ray on this machine and on every node of "
                        "the Ray cluster: pip install 'moeserve[ray]'")


def check_device(device: str, num_ranks: int = 1) -> None:
    """The device exists: ``cuda`` needs a CUDA build of torch that sees a GPU, ``npu`` needs torch_npu and
    an NPU; an index (``cuda:1``) must be below the device count, and ``num_ranks`` ranks need that many."""
    kind, _, index_text = device.partition(":")
    if kind == "cpu":
        return
    if index_text and not index_text.isdigit():
        raise UserError(f"--device {device}: the device index must be a number, e.g. {kind}:0")
    count = _device_count(device, kind)
    need = int(index_text) + 1 if index_text and num_ranks <= 1 else max(1, num_ranks)
    if need > count:
        what = f"index {index_text}" if index_text and num_ranks <= 1 else f"{need} ranks, one device each,"
        raise UserError(f"--device {device}: {what} needs {need} {kind} device(s), this machine has {count}")


def _device_count(device: str, kind: str) -> int:
    if kind == "cuda":
        if torch.version.cuda is None:
            raise UserError(f"--device {device}: this torch ({torch.__version__}) is built without CUDA; "
                            "use --device cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is visible (check the driver and "
                            "CUDA_VISIBLE_DEVICES); use --device cpu")
        return torch.cuda.device_count()
    from moeserve.comm.groups import backend_for

    try:
        backend_for(device)  # imports torch_npu, or says how to install it
    except ImportError as e:
        raise UserError(str(e)) from e
    npu = getattr(torch, "npu", None)
    count = npu.device_count() if npu is not None else 0
    if not count:
        raise UserError(f"--device {device}: torch_npu sees no NPU (check npu-smi info and "
                        "ASCEND_RT_VISIBLE_DEVICES); use --device cpu")
    return count


def check_model_dir(path: Path, load_format: str = "auto") -> ModelConfig:
    """A DeepSeek-V2/V3 checkpoint directory: config.json that moeserve supports and, unless the weights
    are dummy, the safetensors its index names."""
    if not path.exists():
        raise UserError(f"model directory {path} does not exist: give --model a Hugging Face-format DeepSeek "
                        "checkpoint directory (config.json, *.safetensors, tokenizer.json), or leave --model "
                        "out for the embedded model")
    if not path.is_dir():
        raise UserError(f"--model {path} is a file; give the checkpoint's directory")
    model_config = ModelConfig.from_hf(path)  # ConfigError names the field
    if load_format != "dummy":
        from moeserve.model.loader import Checkpoint, CheckpointError

        try:
            Checkpoint(path)
        except CheckpointError as e:
            raise UserError(f"{e} (--load-format dummy runs random weights from config.json alone)") from e
    return model_config


def check_tokenizer(path: Path) -> None:
    if not (path / TOKENIZER_FILE).is_file():
        raise UserError(f"{path} has no {TOKENIZER_FILE}: copy the checkpoint's Hugging Face tokenizer files "
                        "(tokenizer.json, tokenizer_config.json) into it, or pass --skip-tokenizer-init to "
                        "send and receive token ids only")


def check_layout(config: EngineConfig, model_config: ModelConfig) -> ParallelPlan:
    """The pp x tp x ep layout, the hand-given layer split and the expert placement file fit the model, as
    the engine will plan them (the placement file is checked against the layout even in one process);
    returns that plan."""
    from moeserve.coordinator.plan import make_plan, parse_pp_layers

    placement = Path(config.expert_placement) if config.expert_placement else None
    try:
        dims = config.parallel_dims
    except ValueError as e:  # degrees that are no layout at all (ep neither 1 nor tp, ...)
        raise UserError(str(e)) from e
    try:
        pp_layers = parse_pp_layers(config.pp_layers, model_config.num_hidden_layers, dims.pp) \
            if config.pp_layers else None
        dtype_bytes = torch.empty((), dtype=config.torch_dtype).element_size()
        return make_plan(model_config, dims, dtype_bytes, pp_layers=pp_layers, placement_file=placement,
                         keep_fp8=config.effective_keep_fp8)
    except ValueError as e:  # InfeasiblePlanError, a bad --pp-layers text, a bad placement file
        raise UserError(f"layout {dims.describe()}: {e} (moeserve plan shows a layout without loading "
                        "anything)") from e


def check_kv_cache(config: EngineConfig, plan: ParallelPlan) -> None:
    """A given --kv-cache-memory holds at least one block on the rank with the most layers, as the engine
    sizes the cache (a budget from free device memory is known only once the weights are loaded)."""
    if config.kv_cache_memory:
        per_token = max(plan.cache_bytes_per_token(stage) for stage in range(plan.dims.pp))
        blocks_in_budget(config.kv_cache_memory, config.effective_block_size, per_token)


def check_ports(host: str, ports: list[tuple[str, int]]) -> None:
    """Each (flag, port) can be listened on at ``host`` now (port 0: any free port, always fine)."""
    for flag, port in ports:
        if not 0 < port < 65536:  # 0: any free port; out of range: the server's config says so
            continue
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as e:
            raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from e
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and ZeroMQ bind
            try:
                s.bind(address)
            except OSError as e:
                raise UserError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror}); another "
                                f"process holds it: stop it or choose another port with {flag}") from e
