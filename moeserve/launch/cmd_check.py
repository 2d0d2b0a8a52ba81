"""``moeserve check``: what this machine offers, and whether a checkpoint is supported."""

from __future__ import annotations

import argparse
import importlib.util
import platform

NEEDS_ENGINE_ARGS = False


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("check", help="report torch, devices, backends, ZeroMQ and checkpoint support")
    p.add_argument("--model", default="", help="checkpoint directory to check (default: the embedded model)")
    return p


def environment_report() -> list[tuple[str, str]]:
    import torch
    import torch.distributed as dist
    import zmq

    rows = [("python", platform.python_version()), ("torch", torch.__version__)]
    cuda = torch.cuda.is_available()
    rows.append(("cuda", f"{torch.cuda.device_count()} device(s): " + ", ".join(
        torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "not available"))
    npu = importlib.util.find_spec("torch_npu") is not None
    rows.append(("npu", "torch_npu installed (import with --device npu)" if npu else "torch_npu not installed"))
    rows.extend(cpu_rows(torch.get_num_threads()))
    backends = [name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()),
                                      ("mpi", dist.is_mpi_available())) if ok]
    if npu:
        backends.append("hccl")
    rows.append(("distributed", ", ".join(backends) if dist.is_available() else "not available"))
    rows.append(("zeromq", f"libzmq {zmq.zmq_version()}, pyzmq {zmq.pyzmq_version()}"))
    return rows


def cpu_rows(threads: int) -> list[tuple[str, str]]:
    from moeserve.cpu_runtime import describe, describe_openmp
    from moeserve.model.cpu_info import cpu_info, matmul_path

    info = cpu_info()
    return [("cpu", f"{info.model} ({info.arch}), {threads} threads"),
            ("cpu isa", ", ".join(info.flags) or "none of the matmul extensions moeserve looks for"),
            ("cpu matmul", f"float32: {matmul_path(info, 'float32')}; bfloat16: {matmul_path(info, 'bfloat16')}"),
            ("cpu kernels", cpu_kernels_row()), ("cpu malloc", describe()), ("cpu openmp", describe_openmp())]


def cpu_kernels_row() -> str:
    from moeserve.kernels.cpu_build import status

    return status()  # builds them on first use (a few seconds once per machine)


def checkpoint_report(path: str) -> tuple[bool, list[tuple[str, str]]]:
    from moeserve.coordinator.config import default_model_path
    from moeserve.model.config import ConfigError, ModelConfig
    from moeserve.model.loader import Checkpoint, CheckpointError

    target = path or str(default_model_path())
    try:
        config = ModelConfig.from_hf(target)  # unsupported fields first: they name the field
        ckpt = Checkpoint(target)
    except (ConfigError, CheckpointError) as e:
        return False, [("checkpoint", target), ("supported", f"no: {e}")]
    rows = [("checkpoint", target), ("model_type", config.model_type),
            ("layers", f"{config.num_hidden_layers} ({config.first_k_dense_replace} dense first)"),
            ("experts", f"{config.n_routed_experts} routed (top-{config.num_experts_per_tok}, "
                        f"{config.scoring_func}/{config.topk_method}), {config.n_shared_experts} shared"),
            ("attention", f"MLA, q_lora_rank={config.q_lora_rank}, kv_lora_rank={config.kv_lora_rank}, "
                          f"rope={config.rope.rope_type}"),
            ("weights", f"{ckpt.total_bytes() / 1e6:.1f} MB in {len(set(ckpt.weight_map.values()))} file(s)"
                        + (", FP8 block-scaled" if config.quant_block_size else "")),
            ("fingerprint", ckpt.fingerprint()), ("supported", "yes")]
    return True, rows


def run(args: argparse.Namespace) -> int:
    ok, ckpt_rows = checkpoint_report(args.model)
    rows = environment_report() + ckpt_rows
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0 if ok else 1
