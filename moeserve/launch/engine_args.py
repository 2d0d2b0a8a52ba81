"""The engine's command-line flags, made from ``EngineConfig``'s fields: each field is one flag
(``--max-num-seqs`` for ``max_num_seqs``) with the field's type and default, and the help written here.
``engine_config`` turns parsed flags back into the config, so a new setting is declared once, in the config,
and its help once, below (a field without help fails ``add_engine_args``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from moeserve.coordinator.config import ALLOW_LONG_ENV, EXECUTOR_BACKENDS, LOAD_FORMATS, EngineConfig
from moeserve.errors import UserError
from moeserve.kvstore.store import STORE_ENV

NOT_FLAGS = ("load_progress", "allow_long_max_model_len")  # set by the command, and from the environment
FIELD_DEFAULT = object()  # a flag's default is its field's
PD = "prefill/decode disaggregation"


@dataclass(frozen=True)
class Flag:
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    group: str = "engine"
    default: Any = FIELD_DEFAULT  # or the command line's own


FLAGS: dict[str, Flag] = {
    "model": Flag("checkpoint directory (default: the embedded model)"),
    "device": Flag("cpu, cuda[:N] or npu[:N]; with several local ranks, rank i takes device i"),
    "dtype": Flag("weights and cache; auto = float32 on CPU, bfloat16 on accelerators",
                  choices=("auto", "float32", "bfloat16", "float16")),
    "block_size": Flag("tokens per cache block (default 16 CPU / 64 GPU)"),
    "kv_cache_memory": Flag("bytes for the latent cache (default: 1 GiB on CPU, a fraction of free GPU memory)"),
    "gpu_memory_utilization": Flag("fraction of free device memory for the cache when --kv-cache-memory is not "
                                   "given"),
    "max_num_seqs": Flag("sequences in one batch, at most"),
    "max_num_batched_tokens": Flag("tokens per engine step, at most (long prompts are prefilled in chunks of this "
                                   "budget); 0 = 2048 on CPU, 8192 on GPUs"),
    "max_model_len": Flag("context length: prompt + generated tokens, at most the model's "
                          "max_position_embeddings (past it only with MOESERVE_ALLOW_LONG_MAX_MODEL_LEN=1, as "
                          "vLLM's variable); 0 = that"),
    "seed": Flag("sampling seed: makes sampled output reproducible (each request is seeded with it; default: "
                 "unseeded, a fresh seed each run; dummy weights use 0)", default=None),
    "skip_tokenizer_init": Flag("load no tokenizer: token ids in and out only (bench, or a model directory "
                                "without one; default: load tokenizer.json)"),
    "pp": Flag("pipeline stages (pp x tp > 1 starts pp x tp ranks)"),
    "tp": Flag("tensor-parallel ranks per stage"),
    "ep": Flag("expert parallelism: tp (default) spreads experts over a stage's ranks; 1 splits each expert"),
    "pp_layers": Flag("hand-given layer split, e.g. 14,13 (default: balanced by cost)"),
    "distributed_executor_backend": Flag(
        "how the ranks of pp x tp > 1 start: mp = processes on this machine; ray = Ray actors on the Ray "
        "cluster of RAY_ADDRESS (or a local one started for this run), placed tp ranks inside a node "
        "(pip install 'moeserve[ray]'; as vLLM's flag)", choices=EXECUTOR_BACKENDS),
    "load_format": Flag("auto: read the checkpoint (default); dummy: random weights made on the device from "
                        "config.json alone (benchmarks; pair with --skip-tokenizer-init when the directory has no "
                        "tokenizer)", choices=LOAD_FORMATS),
    "keep_fp8": Flag("keep an FP8 checkpoint's routed experts in float8, dequantized one layer at a time "
                     "(default: on for cuda/npu, off for cpu)"),
    "ep_dispatch": Flag("how tokens reach expert-parallel experts: every rank runs its experts on all tokens and "
                        "one all-reduce sums them (allreduce), or each rank sends its share of the tokens to the "
                        "expert owners (alltoall)", choices=("allreduce", "alltoall")),
    "expert_placement": Flag("JSON file mapping each EP rank's slots to logical experts (copies of hot experts "
                             "allowed; see moeserve plan --placement; default: contiguous ranges)"),
    "enforce_eager": Flag("no CUDA graphs: launch every decode kernel one by one (graphs are captured at start "
                          "for batch sizes up to --max-num-seqs on CUDA devices)"),
    "async_scheduling": Flag("schedule and launch each decode step while the device still runs the one before, "
                             "and process its outputs afterwards (as vLLM's --async-scheduling and SGLang's "
                             "overlap scheduler); steps of requests with penalties or structured output run "
                             "synchronously (default: on for cuda, off for cpu and npu; one process only)"),
    "kv_host_memory": Flag("host memory per rank for cache blocks evicted from the device, which come back "
                           "instead of being recomputed (default: min(2 GiB, RAM/16) on GPUs and NPUs, off on CPU, where the "
                           "cache already is host memory; 0 turns it off)",
                           metavar="BYTES", group="kv store"),
    "kv_store": Flag("a store server shared by nodes: redis://[user:password@]host:port/db (redis-server or "
                     "Valkey), or several separated by commas (keys spread over them, each server answering its "
                     "share of a load); prefixes computed by any engine are reused by the others (default: the "
                     f"{STORE_ENV} environment variable, which keeps the password off command lines)",
                     metavar="URL", group="kv store"),
    "kv_store_salt": Flag("tenant salt: only engines with the same salt share blocks", group="kv store"),
    "kv_store_timeout": Flag("seconds for each store call", group="kv store"),
    "kv_store_probe_interval": Flag("seconds between probes of a failing store (its circuit breaker is open "
                                    "meanwhile)", group="kv store"),
    "kv_load_cost_rule": Flag("skip store loads measured to be slower than recomputing the tokens (default on)",
                              group="kv store"),
    "kv_layerwise": Flag("layer-wise loading (LMCache's use_layerwise): a request whose prefix comes from the host "
                         "tier or the store is scheduled as soon as its load starts, and each layer of the step "
                         "waits only for its own blocks; a load that turns out short costs the step's token for "
                         "that request, which is recomputed (default off: without it a request waits for its "
                         "whole load)", group="kv store"),
    "kv_store_connections": Flag("connections per rank over which a store load's chunks are read in parallel",
                                 group="kv store"),
    "kv_store_write_buffer": Flag("bytes per rank of (pinned, on GPUs) memory for blocks waiting to be written to "
                                  "the store; blocks that find it full are not stored (the prefix's later blocks, "
                                  "counted in moeserve_kv_store_writes_dropped_total): one 32k-token DeepSeek-V2-Lite "
                                  "prompt is about 1 GB", metavar="BYTES", group="kv store"),
    "disaggregation_mode": Flag("serve one role: prefill (computes prompts, holds their latent blocks for a decode "
                                "instance to pull) or decode (pulls them, streams the tokens); behind `moeserve "
                                "router --prefill URL --decode URL` (default: both, colocated)",
                                choices=("", "prefill", "decode"), group=PD),
    "kv_transfer_backend": Flag("how latent blocks move between instances: zmq (msgpack control, raw byte frames "
                                "on the same socket) or nixl (a NIXL read between registered caches: UCX over "
                                "shared memory or TCP, CUDA IPC or RDMA on GPUs; needs the nixl package); both "
                                "roles give the same", choices=("zmq", "nixl"), group=PD),
    "kv_transfer_addr": Flag("a prefill instance's transfer server address (port 0: any free port)", group=PD),
    "kv_transfer_timeout": Flag("seconds a decode instance waits for a transfer before computing the prompt "
                                "itself", group=PD),
    "kv_transfer_hold": Flag("seconds a prefill instance holds a finished request's blocks for a decode instance "
                             "to pull (then frees them)", group=PD),
    "expert_load_interval": Flag("engine steps between gathers of every rank's expert-load counters (/metrics, "
                                 "/dashboard)"),
    "num_redundant_experts": Flag("extra expert slots over the EP ranks for copies of hot experts (online "
                                  "rebalancing)"),
    "eplb_interval": Flag("steps between online expert rebalancing checks (0: only on POST /admin/rebalance)"),
    "eplb_threshold": Flag("move a MoE layer's experts when its EP ranks' balancedness (mean / max load) since "
                           "its placement began falls below this"),
    "eplb_hysteresis": Flag("... and only when the planner predicts its heaviest rank at least this much faster "
                            "(0.05: 5 percent)"),
    "eplb_max_stall_ms": Flag("the longest a step may wait while expert weights move between ranks: a "
                              "rebalance is cut into chunks of slots that fit"),
    "max_restarts": Flag("a rank that dies is replaced (every rank of the replica restarts, the weights are loaded "
                         "again, requests go on) at most this many times within --restart-window; one failure more "
                         "stops the server, naming the rank and node (0: stop at the first, as vLLM)",
                         group="fault tolerance"),
    "restart_window": Flag("seconds over which --max-restarts counts rank failures", metavar="SECONDS",
                           group="fault tolerance"),
    "resume_streams": Flag("after a restart, streams that were mid-decode go on from the tokens already sent (no "
                           "gap, no duplicate); --no-resume-streams ends them with a retryable engine_error "
                           "(queued and prefilling requests always go on)", group="fault tolerance"),
    "speculative_config": Flag('speculative decoding, as vLLM\'s flag: {"method": "mtp", "num_speculative_tokens": '
                               'K} drafts K tokens a step with the model\'s multi-token-prediction module '
                               '(DeepSeek-V3/R1) (optional: "adaptive": false keeps drafting whatever it measures)',
                               metavar="JSON"),
}

KINDS = {"str": str, "int": int, "float": float, "int | None": int,
         "SpeculativeConfig | None": str}  # the flag's JSON text: EngineConfig parses it


def flag_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EngineConfig) if f.name not in NOT_FLAGS]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    groups: dict[str, Any] = {}
    for field in flag_fields():
        flag = FLAGS.get(field.name)
        if flag is None:
            raise TypeError(f"EngineConfig.{field.name} has no command-line help in launch/engine_args.py")
        group = groups.get(flag.group) or groups.setdefault(flag.group, p.add_argument_group(flag.group))
        default = field.default if flag.default is FIELD_DEFAULT else flag.default
        if field.name == "kv_store":  # read when the parser is built
            default = os.environ.get(STORE_ENV, "")
        kwargs: dict[str, Any] = dict(default=default, help=flag.help)
        if field.type == "bool" and default is False:
            kwargs["action"] = "store_true"
        elif field.type in ("bool", "bool | None"):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=KINDS[str(field.type)], choices=flag.choices, metavar=flag.metavar)
        group.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def engine_config(args: argparse.Namespace, progress: bool = True) -> EngineConfig:
    """The EngineConfig of the engine flags; a value it refuses is a UserError (one line, exit 1)."""
    try:
        return EngineConfig(**{f.name: getattr(args, f.name) for f in flag_fields()}, load_progress=progress,
                            allow_long_max_model_len=os.environ.get(ALLOW_LONG_ENV, "").strip().lower()
                            in ("1", "true"))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e
