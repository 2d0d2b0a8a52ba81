"""How an Engine is built: the size of its latent cache, and the runner that owns the model -- a
``ModelRunner`` in this process, or the stage workers of a distributed replica."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeserve.coordinator.config import DEFAULT_CPU_KV_BYTES, EngineConfig
from moeserve.dtypes import dtype_name
from moeserve.kvstore.latent_cache import blocks_in_budget, free_device_memory
from moeserve.kvstore.tier_setup import worker_options
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel
from moeserve.stages.runner import ModelRunner

if TYPE_CHECKING:
    from moeserve.coordinator.executor import Launcher

logger = logging.getLogger(__name__)


def kv_cache_blocks(config: EngineConfig, per_token: int) -> int:
    """Capacity of the latent cache in blocks, from the memory budget (``per_token``: bytes one token
    takes in the cache of the rank holding the most layers); CacheBudgetError (a UserError) if not one."""
    budget, source = config.kv_cache_memory, "--kv-cache-memory"
    if not budget:
        free = free_device_memory(config.torch_device)
        budget = int(free * config.gpu_memory_utilization) if free is not None else DEFAULT_CPU_KV_BYTES
        source = "the free device memory x --gpu-memory-utilization" if free is not None else "the CPU default"
    return blocks_in_budget(budget, config.effective_block_size, per_token, source)


def local_runner(config: EngineConfig, model: DeepseekModel, max_model_len: int) -> tuple[int, ModelRunner]:
    """Size the cache and build the one-process runner: (number of blocks, runner)."""
    num_blocks = kv_cache_blocks(config, model.cache_bytes_per_token())
    runner = ModelRunner(model, num_blocks, config.effective_block_size, config.torch_device,
                         cuda_graphs=config.use_cuda_graphs, max_num_seqs=config.max_num_seqs,
                         max_model_len=max_model_len, warm_up_tokens=config.effective_max_num_batched_tokens)
    logger.info("latent cache bytes per token: %d", runner.cache_bytes_per_token)
    return num_blocks, runner


def distributed_runner(config: EngineConfig, model_config: ModelConfig, launcher: Launcher | None = None):
    """Plan the layout, size the cache, and start the stage workers of one replica: on this machine, or,
    with a cluster ``launcher`` (launch/cluster.py), across the nodes of a cluster.
    Returns (the ParallelPlan, number of blocks, the DistributedExecutor)."""
    from moeserve.coordinator.executor import DistributedExecutor, ReplicaLayout
    from moeserve.coordinator.plan import make_plan, parse_pp_layers

    dims = config.parallel_dims
    dtype_bytes = torch.empty((), dtype=config.torch_dtype).element_size()
    pp_layers = parse_pp_layers(config.pp_layers, model_config.num_hidden_layers, dims.pp) \
        if config.pp_layers else None
    plan = make_plan(model_config, dims, dtype_bytes, pp_layers=pp_layers, keep_fp8=config.effective_keep_fp8,
                     placement_file=Path(config.expert_placement) if config.expert_placement else None)
    # the last stage holds the MTP module's cache besides its layers' (speculative decoding)
    mtp_layers = [0] * (dims.pp - 1) + [int(config.speculative_config is not None)]
    per_token = max(n + m for n, m in zip(plan.stage_layers, mtp_layers)) * model_config.kv_cache_dim * dtype_bytes
    logger.info("latent cache bytes per token: %d on the largest stage (%s)", per_token, dims.describe())
    num_blocks = kv_cache_blocks(config, per_token)
    dtype = dtype_name(config.torch_dtype)
    options = dict(load_format=config.load_format, keep_fp8=config.effective_keep_fp8, seed=config.weights_seed,
                   ep_dispatch=config.ep_dispatch, placement_file=config.expert_placement,
                   max_positions=config.max_model_len, cuda_graphs=config.use_cuda_graphs,
                   max_num_seqs=config.max_num_seqs, warm_up_tokens=config.effective_max_num_batched_tokens,
                   mtp=config.speculative_config is not None, **worker_options(config, per_token))
    layout = ReplicaLayout(str(config.model_path), dims, tuple(plan.stage_layers), dtype, config.device,
                           config.effective_block_size, num_blocks, tuple(options.items()))
    return plan, num_blocks, (launcher or DistributedExecutor.local)(layout)
