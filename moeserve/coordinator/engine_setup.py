"""How an Engine is built: the layout of its ranks, the size of its latent cache, and the executor that runs
them (executor.py) -- one rank in this process, or stage workers started by the configured backend."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import torch

from moeserve.coordinator.config import DEFAULT_CPU_KV_BYTES, EngineConfig
from moeserve.coordinator.executor import Launcher, ReplicaLayout
from moeserve.coordinator.inproc_executor import InProcessExecutor
from moeserve.coordinator.mp_executor import MultiprocExecutor
from moeserve.coordinator.plan import ParallelPlan, make_plan, parse_pp_layers
from moeserve.dtypes import dtype_name
from moeserve.errors import UserError
from moeserve.experts.eplb import plan_placement
from moeserve.kvstore.latent_cache import blocks_in_budget, free_device_memory
from moeserve.kvstore.tier_setup import worker_options
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel

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


def replica_layout(config: EngineConfig, model_config: ModelConfig) -> tuple[ParallelPlan | None, ReplicaLayout]:
    """Plan the layout (several ranks: the layer split and the expert placement) and size the cache:
    (the ParallelPlan, or None for one rank; the ReplicaLayout every rank is started from)."""
    dims = config.parallel_dims
    dtype_bytes = torch.empty((), dtype=config.torch_dtype).element_size()
    plan = None
    stage_layers: tuple[int, ...] = (model_config.num_hidden_layers,)
    if config.is_distributed:
        pp_layers = parse_pp_layers(config.pp_layers, model_config.num_hidden_layers, dims.pp) \
            if config.pp_layers else None
        plan = make_plan(model_config, dims, dtype_bytes, pp_layers=pp_layers, keep_fp8=config.effective_keep_fp8,
                         placement_file=Path(config.expert_placement) if config.expert_placement else None)
        stage_layers = tuple(plan.stage_layers)
    # the last stage holds the MTP module's cache besides its layers' (speculative decoding)
    mtp_layers = [0] * (dims.pp - 1) + [int(config.speculative_config is not None)]
    per_token = max(n + m for n, m in zip(stage_layers, mtp_layers)) * model_config.kv_cache_dim * dtype_bytes
    logger.info("latent cache bytes per token: %d on the largest stage (%s)", per_token, dims.describe())
    num_blocks = kv_cache_blocks(config, per_token)
    options = dict(load_format=config.load_format, keep_fp8=config.effective_keep_fp8, seed=config.weights_seed,
                   ep_dispatch=config.ep_dispatch, placement_file=config.expert_placement,
                   max_positions=config.max_model_len, cuda_graphs=config.use_cuda_graphs,
                   max_num_seqs=config.max_decode_rows, warm_up_tokens=config.effective_max_num_batched_tokens,
                   mtp=config.speculative_config is not None, **worker_options(config, per_token))
    layout = ReplicaLayout(str(config.model_path), dims, stage_layers, dtype_name(config.torch_dtype), config.device,
                           config.effective_block_size, num_blocks, tuple(options.items()))
    return plan, layout


def default_launcher(config: EngineConfig, model: DeepseekModel | None = None) -> Launcher:
    """One rank: in this process (``model``, if given, is used as it is). Several: processes here (mp), or
    Ray actors (``--distributed-executor-backend ray``; Ray is imported only then)."""
    if not config.is_distributed:
        # the cache is sized once the weights are loaded, from the memory they left (unless a budget is given)
        sized = None if config.kv_cache_memory else (lambda per_token: kv_cache_blocks(config, per_token))
        return InProcessExecutor.launcher(model, progress=config.load_progress, size_cache=sized)
    if config.distributed_executor_backend == "ray":
        try:
            from moeserve.coordinator.ray_executor import RayExecutor  # the optional extra moeserve[ray]
        except ImportError as e:
            raise UserError(f"--distributed-executor-backend ray needs Ray ({e}): pip install 'moeserve[ray]'") from e
        return RayExecutor.launch
    return MultiprocExecutor.local


def with_redundant_slots(config: EngineConfig, num_experts: int) -> EngineConfig:
    """With ``num_redundant_experts`` and no placement file, write the planner's placement for an even load
    (every rank ``(E + R) / ep`` slots) and point the config at it."""
    if not config.num_redundant_experts or config.expert_placement or not num_experts or not config.is_distributed:
        return config
    ep = config.parallel_dims.ep
    slots, rest = divmod(num_experts + config.num_redundant_experts, ep)
    if rest or ep < 2:
        raise ValueError(f"n_routed_experts ({num_experts}) + num_redundant_experts "
                         f"({config.num_redundant_experts}) must split evenly over ep ({ep}) >= 2 ranks")
    phy2log = plan_placement(torch.ones(1, num_experts), ep, slots)[0].tolist()
    path = Path(tempfile.mkdtemp(prefix="moeserve-placement-")) / "placement.json"
    path.write_text(json.dumps({"phy2log": phy2log}))
    return dataclasses.replace(config, expert_placement=str(path))
