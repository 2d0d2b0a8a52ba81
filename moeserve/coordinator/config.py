"""EngineConfig: every setting of one serving engine, defined once and validated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moeserve.coordinator.spec_config import SpeculativeConfig
from moeserve.errors import UserError
from moeserve.kvstore.store import WRITE_BUFFER_BYTES, check_store_url

# NOTE: torch is imported where it is used, not here: the command line makes its flags from this class
# (launch/engine_args.py) and must answer --help, or a node's launcher set its C++ log level, before torch loads
if TYPE_CHECKING:
    import torch

    from moeserve.model.config import ModelConfig

DEFAULT_CPU_KV_BYTES = 1 << 30
LOAD_FORMATS = ("auto", "dummy")  # as in moeserve.model.loader (not imported: this module stays light)
EXECUTOR_BACKENDS = ("mp", "ray")  # --distributed-executor-backend (coordinator/executor.py)
ALLOW_LONG_ENV = "MOESERVE_ALLOW_LONG_MAX_MODEL_LEN"  # as vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN


class ContextLengthError(UserError, ValueError):
    """A --max-model-len past the model's max_position_embeddings, not allowed explicitly."""


def default_model_path() -> Path:
    """The small DeepSeek-V3-architecture checkpoint that ships inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "default_model"


@dataclass(frozen=True)
class EngineConfig:
    model: str = ""  # checkpoint directory; empty = the embedded default model
    device: str = "cpu"
    dtype: str = "auto"  # float32 on CPU, bfloat16 on accelerators
    block_size: int = 0  # 0 = 16 on CPU, 64 on accelerators
    kv_cache_memory: int = 0  # bytes for the latent cache; 0 = a fraction of free device memory
    gpu_memory_utilization: float = 0.9  # fraction of free device memory used for the cache
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 0  # per-step token budget; 0 = by device (2048 on CPU, 8192 on GPUs)
    max_model_len: int = 0  # 0 = the model's max_position_embeddings
    allow_long_max_model_len: bool = False  # max_model_len may pass max_position_embeddings (env ALLOW_LONG_ENV)
    seed: int | None = 0  # the engine's sampling RNG; None: a fresh seed each run (dummy weights then use 0)
    load_progress: bool = False
    skip_tokenizer_init: bool = False  # token ids in and out only (benchmarks on random weights)
    pp: int = 1  # pipeline stages (worker processes are spawned when pp * tp > 1)
    tp: int = 1  # tensor-parallel ranks per stage
    ep: int = 0  # expert parallel degree: 0 = tp (experts spread over the stage), 1 = tensor-parallel experts
    pp_layers: str = ""  # a hand-given layer split, e.g. "14,13"
    distributed_executor_backend: str = "mp"  # how several ranks start: mp (processes here) or ray (actors)
    load_format: str = "auto"  # auto: read the checkpoint; dummy: random weights from config.json alone
    keep_fp8: bool | None = None  # FP8 checkpoints: keep routed experts float8; None = on for accelerators
    ep_dispatch: str = "allreduce"  # how tokens reach expert-parallel experts: allreduce or alltoall
    expert_placement: str = ""  # JSON file mapping each EP rank's physical slots to logical experts
    enforce_eager: bool = False  # no CUDA graphs: every decode step launches its kernels one by one
    # schedule step N+1 while the device runs step N (one process only); None = on for CUDA devices
    async_scheduling: bool | None = None
    kv_host_memory: int = -1  # bytes per rank of the host tier (evicted blocks come back); -1 auto, 0 off
    kv_store: str = ""  # the shared store: redis://[user:password@]host:port/db (empty: none)
    kv_store_salt: str = ""  # a tenant's salt: only engines with the same salt share stored blocks
    kv_store_timeout: float = 1.0  # seconds for each store call
    kv_store_probe_interval: float = 5.0  # seconds between probes of a store whose breaker is open
    kv_load_cost_rule: bool = True  # skip store loads estimated slower than recomputing
    # layer-wise loads from the host tier and the store (LMCache's use_layerwise, off by default there too): off,
    # because on the CPU machine it was measured on the load and the step share the cores and the GIL, and it
    # did not pay (BENCHMARKS.md)
    kv_layerwise: bool = False
    kv_store_connections: int = 4  # connections (and threads) per rank reading a store load's chunks in parallel
    # bytes per writing rank of (pinned, on accelerators) slots for blocks waiting to be written to the store; a
    # block that finds them full is not written (counted as dropped): size it to the longest prompt to be stored
    kv_store_write_buffer: int = WRITE_BUFFER_BYTES
    # prefill/decode disaggregation (kvstore/disagg.py): "" colocated, "prefill" or "decode"
    disaggregation_mode: str = ""
    kv_transfer_backend: str = "zmq"  # how a decode instance pulls latent blocks from a prefill instance
    kv_transfer_addr: str = "tcp://127.0.0.1:0"  # a prefill instance's transfer server (port 0: any free one)
    kv_transfer_timeout: float = 10.0  # seconds a decode instance waits for a transfer before computing itself
    kv_transfer_hold: float = 60.0  # seconds a prefill instance holds a request's blocks for the pull
    expert_load_interval: int = 16  # steps between gathers of the ranks' expert-load counters
    num_redundant_experts: int = 0  # extra expert slots over the EP ranks, for copies of hot experts
    eplb_interval: int = 0  # steps between online rebalancing checks; 0 = only when asked (POST /admin/rebalance)
    eplb_threshold: float = 0.9  # move a layer when its ranks' balancedness (mean / max load) falls below this
    eplb_hysteresis: float = 0.05  # ... and the planner predicts its heaviest rank at least this much faster
    eplb_max_stall_ms: float = 20.0  # the longest a step may wait for expert weights being moved (chunks fit it)
    # self-healing (coordinator/supervisor.py): a dead rank restarts the replica's ranks, at most max_restarts
    # times within restart_window seconds; streams mid-decode resume (or end with a retryable error)
    max_restarts: int = 3
    restart_window: float = 600.0
    resume_streams: bool = True
    # speculative decoding (--speculative-config, e.g. {"method": "mtp", "num_speculative_tokens": 1}); None: off
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        from moeserve.dtypes import DTYPES

        if isinstance(self.speculative_config, (str, dict)):  # the flag's JSON, or asdict() on the way to a replica
            object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda", "npu"):
            raise ValueError(f"device must be cpu, cuda or npu, got {self.device!r}")
        for name in ("block_size", "kv_cache_memory", "max_model_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens < 0:
            raise ValueError("max_num_seqs must be positive and max_num_batched_tokens >= 0 (0 = by device)")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, got "
                             f"{self.distributed_executor_backend!r}")
        if self.ep_dispatch not in ("allreduce", "alltoall"):
            raise ValueError(f"ep_dispatch must be allreduce or alltoall, got {self.ep_dispatch!r}")
        if self.kv_store:
            check_store_url(self.kv_store)  # StoreConfigError, a ValueError without the password
        if self.kv_store_timeout <= 0 or self.kv_store_probe_interval <= 0 or self.kv_store_connections < 1 \
                or self.kv_store_write_buffer < 1:
            raise ValueError("kv_store_timeout, kv_store_probe_interval, kv_store_connections and "
                             "kv_store_write_buffer must be positive")
        self._check_disaggregation()
        if self.num_redundant_experts < 0 or self.eplb_interval < 0 or not self.eplb_max_stall_ms > 0:
            raise ValueError("num_redundant_experts and eplb_interval must be >= 0, eplb_max_stall_ms > 0")
        if not 0 < self.eplb_threshold <= 1 or not 0 <= self.eplb_hysteresis < 1:
            raise ValueError(f"eplb_threshold must be in (0, 1] and eplb_hysteresis in [0, 1), got "
                             f"{self.eplb_threshold}, {self.eplb_hysteresis}")
        if self.expert_load_interval < 1:
            raise ValueError(f"expert_load_interval must be >= 1, got {self.expert_load_interval}")
        if self.max_restarts < 0 or self.restart_window <= 0:
            raise ValueError(f"max_restarts must be >= 0 and restart_window positive, got {self.max_restarts}, "
                             f"{self.restart_window}")
        if self.keep_fp8 not in (None, True, False):
            raise ValueError(f"keep_fp8 must be true, false or None (auto), got {self.keep_fp8!r}")
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be true, false or None (auto), got {self.async_scheduling!r}")

    def _check_disaggregation(self) -> None:
        if self.disaggregation_mode not in ("", "prefill", "decode"):
            raise ValueError(f"disaggregation_mode must be prefill or decode, got {self.disaggregation_mode!r}")
        if self.kv_transfer_backend not in ("zmq", "nixl"):
            raise ValueError(f"kv_transfer_backend must be zmq or nixl, got {self.kv_transfer_backend!r}")
        if not self.kv_transfer_addr.startswith("tcp://") or self.kv_transfer_timeout <= 0 \
                or self.kv_transfer_hold <= 0:
            raise ValueError("kv_transfer_addr must be tcp://host:port; kv_transfer_timeout and kv_transfer_hold "
                             "must be positive")

    @property
    def parallel_dims(self):
        from moeserve.comm.topology import ParallelDims

        return ParallelDims.from_args(self.pp, self.tp, self.ep or None)

    @property
    def is_distributed(self) -> bool:
        return self.pp * self.tp > 1

    @property
    def model_path(self) -> Path:
        return Path(self.model) if self.model else default_model_path()

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)

    @property
    def is_accelerator(self) -> bool:
        return self.torch_device.type != "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        from moeserve.dtypes import serving_dtype

        return serving_dtype(self.dtype, self.device)

    def context_length(self, model: ModelConfig) -> int:
        """The context length for ``model``: max_model_len, or the model's max_position_embeddings. Past
        those positions only with allow_long_max_model_len (see ``long_context_note``), as vLLM does."""
        positions = model.max_position_embeddings
        if self.max_model_len > positions and not self.allow_long_max_model_len:
            raise ContextLengthError(
                f"--max-model-len {self.max_model_len} is more than the model's max_position_embeddings "
                f"({positions}): positions past it were not trained and may give wrong output; lower it, or "
                f"set {ALLOW_LONG_ENV}=1 to run it anyway")
        return self.max_model_len or positions

    @property
    def weights_seed(self) -> int:
        """The seed of dummy weights (and so of their cache fingerprint): the same on every rank and run."""
        return 0 if self.seed is None else self.seed

    @property
    def effective_keep_fp8(self) -> bool:
        """Keep an FP8 checkpoint's routed experts in float8 (a no-op for other checkpoints). Auto: on
        accelerators, where it is what lets DeepSeek-V3 fit; off on CPU, where dequantizing every step
        costs more than the memory it saves on the small models run there."""
        return self.is_accelerator if self.keep_fp8 is None else self.keep_fp8

    @property
    def effective_max_num_batched_tokens(self) -> int:
        """The per-step token budget. By device when not given, as vLLM sizes it: a GPU's prefill is
        bound by its matmul rate only from several thousand tokens a step, so small chunks multiply the
        steps (and the weight reads) of a long prompt; on CPUs a step of 2048 tokens already takes seconds."""
        return self.max_num_batched_tokens or (8192 if self.is_accelerator else 2048)

    @property
    def use_cuda_graphs(self) -> bool:
        return not self.enforce_eager and self.torch_device.type == "cuda" and self.ep_dispatch == "allreduce"

    @property
    def max_decode_rows(self) -> int:
        """The most rows a decode step runs, so the largest CUDA graph: a verify step with speculative decoding
        runs each sequence's drafts as decode rows of their own (``StepPlan.expanded``)."""
        spec = self.speculative_config
        return self.max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0))

    @property
    def effective_async_scheduling(self) -> bool:
        """Whether the engine schedules and launches step N+1 before step N's sampled ids reach the host.
        Auto: on for CUDA devices, where the host's work per step would otherwise leave the GPU idle; off on
        CPUs (nothing to overlap: the host runs the model) and NPUs. Never with stage workers: pipeline
        parallelism already keeps several batches in flight. Not with speculative decoding (its steps draft from
        the verified tokens, on the host)."""
        wanted = self.torch_device.type == "cuda" if self.async_scheduling is None else self.async_scheduling
        return wanted and not self.is_distributed and self.speculative_config is None

    @property
    def effective_block_size(self) -> int:
        return self.block_size or (64 if self.is_accelerator else 16)


def long_context_note(model: ModelConfig, max_model_len: int) -> str:
    """What RoPE scaling covers a context past the model's positions (``allow_long_max_model_len``)."""
    positions, rope = model.max_position_embeddings, model.rope
    head = f"max_model_len {max_model_len} is past the model's {positions} positions, as {ALLOW_LONG_ENV}=1 allows: "
    if rope.rope_type == "yarn":
        return (head + f"config.json's RoPE scaling is yarn, factor {rope.factor:g} (from "
                f"{rope.original_max_position_embeddings} to {positions} positions); it is applied as it is, "
                f"so positions past {positions} are beyond it and quality may degrade")
    return (head + f"config.json gives no RoPE scaling (rope type {rope.rope_type}), so none applies: positions "
            f"past {positions} are untrained and quality will degrade")
