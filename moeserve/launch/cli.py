"""The ``moeserve`` command: generate, bench, check (and more as subsystems land)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from moeserve.errors import UserError
from moeserve.launch import (
    cmd_bench,
    cmd_chat,
    cmd_check,
    cmd_expert_load,
    cmd_generate,
    cmd_launch,
    cmd_plan,
    cmd_router,
    cmd_serve,
)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="", help="checkpoint directory (default: the embedded model)")
    g.add_argument("--device", default="cpu", help="cpu, cuda[:N] or npu[:N]; with several local ranks, rank i takes device i")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights and cache; auto = float32 on CPU, bfloat16 on accelerators")
    g.add_argument("--block-size", type=int, default=0, help="tokens per cache block (default 16 CPU / 64 GPU)")
    g.add_argument("--kv-cache-memory", type=int, default=0,
                   help="bytes for the latent cache (default: 1 GiB on CPU, a fraction of free GPU memory)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of free device memory for the cache when --kv-cache-memory is not given "
                        "(default: %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch, at most")
    g.add_argument("--max-num-batched-tokens", type=int, default=0,
                   help="tokens per engine step, at most (long prompts are prefilled in chunks of this budget); "
                        "0 = 2048 on CPU, 8192 on GPUs")
    g.add_argument("--max-model-len", type=int, default=0,
                   help="context length: prompt + generated tokens, at most the model's max_position_embeddings "
                        "(past it only with MOESERVE_ALLOW_LONG_MAX_MODEL_LEN=1, as vLLM's variable); 0 = that")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages (pp x tp > 1 spawns pp x tp local ranks)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    g.add_argument("--ep", type=int, default=0,
                   help="expert parallelism: tp (default) spreads experts over a stage's ranks; 1 splits each expert")
    g.add_argument("--pp-layers", default="", help="hand-given layer split, e.g. 14,13 (default: balanced by cost)")
    g.add_argument("--ep-dispatch", choices=["allreduce", "alltoall"], default="allreduce",
                   help="how tokens reach expert-parallel experts: every rank runs its experts on all tokens and "
                        "one all-reduce sums them (allreduce), or each rank sends its share of the tokens to "
                        "the expert owners (alltoall)")
    g.add_argument("--expert-placement", default="",
                   help="JSON file mapping each EP rank's slots to logical experts (copies of hot experts "
                        "allowed; see moeserve plan --placement; default: contiguous ranges)")
    g.add_argument("--expert-load-interval", type=int, default=16,
                   help="engine steps between gathers of every rank's expert-load counters (/metrics, /dashboard)")
    g.add_argument("--num-redundant-experts", type=int, default=0,
                   help="extra expert slots over the EP ranks for copies of hot experts (online rebalancing)")
    g.add_argument("--eplb-interval", type=int, default=0,
                   help="steps between online expert rebalancing checks (0: only on POST /admin/rebalance)")
    g.add_argument("--eplb-threshold", type=float, default=0.9,
                   help="rebalance when the EP ranks' balancedness (mean / max load) falls below this")
    g.add_argument("--eplb-hysteresis", type=float, default=0.05,
                   help="... and only when the planner predicts at least this much better balancedness")
    g.add_argument("--eplb-layers-per-step", type=int, default=4,
                   help="MoE layers whose new expert weights each rank copies in after a step while rebalancing")
    g.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="auto: read the checkpoint (default); dummy: random weights made on the device from config.json "
                        "alone (benchmarks; pair with --skip-tokenizer-init when the directory has no tokenizer)")
    g.add_argument("--keep-fp8", action=argparse.BooleanOptionalAction, default=None,
                   help="keep an FP8 checkpoint's routed experts in float8, dequantized one layer at a time "
                        "(default: on for cuda/npu, off for cpu)")
    g.add_argument("--skip-tokenizer-init", action="store_true",
                   help="load no tokenizer: token ids in and out only (bench, or a model directory without one; "
                        "default: load tokenizer.json)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: launch every decode kernel one by one (graphs are captured at start "
                        "for batch sizes up to --max-num-seqs on CUDA devices)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch each decode step while the device still runs the one before, and "
                        "process its outputs afterwards (as vLLM's --async-scheduling and SGLang's overlap "
                        "scheduler); steps of requests with penalties or structured output run synchronously "
                        "(default: on for cuda, off for cpu and npu; one process only)")
    kv = p.add_argument_group("kv store")
    kv.add_argument("--kv-host-memory", type=int, default=-1, metavar="BYTES",
                    help="host memory per rank for cache blocks evicted from the device, which come back instead "
                         "of being recomputed (default: min(2 GiB, RAM/16); 0 turns it off)")
    kv.add_argument("--kv-store", default=os.environ.get("MOESERVE_KV_STORE", ""), metavar="URL",
                    help="a store server shared by nodes: redis://[user:password@]host:port/db (redis-server or "
                         "Valkey); prefixes computed by any engine are reused by the others (default: the "
                         "MOESERVE_KV_STORE environment variable, which keeps the password off command lines)")
    kv.add_argument("--kv-store-salt", default="", help="tenant salt: only engines with the same salt share blocks")
    kv.add_argument("--kv-store-timeout", type=float, default=1.0, help="seconds for each store call")
    kv.add_argument("--kv-store-probe-interval", type=float, default=5.0,
                    help="seconds between probes of a failing store (its circuit breaker is open meanwhile)")
    kv.add_argument("--kv-store-connections", type=int, default=4,
                    help="connections per rank over which a store load's chunks are read in parallel")
    kv.add_argument("--kv-load-cost-rule", action=argparse.BooleanOptionalAction, default=True,
                    help="skip store loads measured to be slower than recomputing the tokens (default on)")
    pd = p.add_argument_group("prefill/decode disaggregation")
    pd.add_argument("--disaggregation-mode", default="", choices=("", "prefill", "decode"),
                    help="serve one role: prefill (computes prompts, holds their latent blocks for a decode "
                         "instance to pull) or decode (pulls them, streams the tokens); behind `moeserve router "
                         "--prefill URL --decode URL` (default: both, colocated)")
    pd.add_argument("--kv-transfer-backend", default="zmq", choices=("zmq", "nixl"),
                    help="how latent blocks move between instances: zmq (msgpack control, raw byte frames on the "
                         "same socket) or nixl (a NIXL read between registered caches: UCX over shared memory or "
                         "TCP, CUDA IPC or RDMA on GPUs; needs the nixl package); both roles give the same")
    pd.add_argument("--kv-transfer-addr", default="tcp://127.0.0.1:0",
                    help="a prefill instance's transfer server address (port 0: any free port)")
    pd.add_argument("--kv-transfer-timeout", type=float, default=10.0,
                    help="seconds a decode instance waits for a transfer before computing the prompt itself")
    g.add_argument("--speculative-config", default="", metavar="JSON",
                   help='speculative decoding, as vLLM\'s flag: {"method": "mtp", "num_speculative_tokens": K} '
                        "drafts K tokens a step with the model's multi-token-prediction module (DeepSeek-V3/R1) "
                        '(optional: "adaptive": false keeps drafting whatever it measures)')
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed: makes sampled output reproducible (each request is seeded with it; "
                        "default: unseeded, a fresh seed each run; dummy weights use 0)")


def engine_config(args: argparse.Namespace, progress: bool = True):
    """The EngineConfig of the engine flags; a value it refuses is a UserError (one line, exit 1)."""
    from moeserve.coordinator.config import ALLOW_LONG_ENV, EngineConfig
    from moeserve.coordinator.spec_config import SpeculativeConfig

    try:
        return EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len, seed=args.seed, load_progress=progress, pp=args.pp, tp=args.tp,
            ep=args.ep, pp_layers=args.pp_layers, load_format=args.load_format, keep_fp8=args.keep_fp8,
            skip_tokenizer_init=args.skip_tokenizer_init, ep_dispatch=args.ep_dispatch,
            expert_placement=args.expert_placement, enforce_eager=args.enforce_eager,
            async_scheduling=args.async_scheduling,
            kv_host_memory=args.kv_host_memory, kv_store=args.kv_store,
            kv_store_salt=args.kv_store_salt, kv_store_timeout=args.kv_store_timeout,
            kv_store_probe_interval=args.kv_store_probe_interval, kv_load_cost_rule=args.kv_load_cost_rule,
            kv_store_connections=args.kv_store_connections,
            disaggregation_mode=args.disaggregation_mode, kv_transfer_backend=args.kv_transfer_backend,
            kv_transfer_addr=args.kv_transfer_addr, kv_transfer_timeout=args.kv_transfer_timeout,
            expert_load_interval=args.expert_load_interval, num_redundant_experts=args.num_redundant_experts,
            eplb_interval=args.eplb_interval, eplb_threshold=args.eplb_threshold,
            eplb_hysteresis=args.eplb_hysteresis, eplb_layers_per_step=args.eplb_layers_per_step,
            allow_long_max_model_len=os.environ.get(ALLOW_LONG_ENV, "").strip().lower() in ("1", "true"),
            speculative_config=SpeculativeConfig.parse(args.speculative_config))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help text already says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser below it (``launch`` -> ``launch cluster``)."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += subparsers(child)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description="Serve DeepSeek-style MoE models.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level, and print the traceback with an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (cmd_generate, cmd_bench, cmd_check, cmd_plan, cmd_launch, cmd_serve, cmd_router, cmd_chat,
                   cmd_expert_load):
        p = module.add_parser(sub)
        if getattr(module, "NEEDS_ENGINE_ARGS", False):
            add_engine_args(p)
        p.set_defaults(func=module.run)
    for p in subparsers(parser):
        p.formatter_class = HelpFormatter
        if p is not parser:  # -v after the subcommand too (SUPPRESS: the top-level value stands otherwise)
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="log at INFO level, and print the traceback with an error (default: off)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from moeserve.kvstore.store import StoreConfigError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except StoreConfigError as e:  # e.g. the KV store's password: a start-up error, said plainly
        print(f"moeserve {args.command}: {e}", file=sys.stderr)
        return 2
    except UserError as e:  # something the user can fix: one line, the traceback only with -v
        if args.verbose:
            traceback.print_exc()
        print(f"{command_name(args)}: error: {e}", file=sys.stderr)
        return 1


def command_name(args: argparse.Namespace) -> str:
    """``moeserve generate``, ``moeserve launch cluster``, ..."""
    return " ".join(["moeserve", args.command] + ([args.launch_command] if getattr(args, "launch_command", None)
                                                  else []))


if __name__ == "__main__":
    sys.exit(main())
