"""The serving engine of one replica: scheduler, latent cache, model runner, sampler.

``Engine.step()`` reads as numbered steps: schedule -> run the model -> sample -> process outputs.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeserve.coordinator.config import DEFAULT_CPU_KV_BYTES, EngineConfig, long_context_note
from moeserve.coordinator.load_monitor import ExpertLoadMonitor
from moeserve.coordinator.outputs import OutputProcessor, RequestOutput
from moeserve.coordinator.rebalancer import EplbConfig, with_redundant_slots
from moeserve.coordinator.request import Request, RequestError, RequestStatus
from moeserve.coordinator.sampling import Sampler, SamplingParams, make_sampling_batch
from moeserve.coordinator.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from moeserve.dtypes import dtype_name
from moeserve.kvstore.cache_manager import KVCacheManager
from moeserve.kvstore.latent_cache import blocks_in_budget, free_device_memory
from moeserve.kvstore.tier_setup import build_tiers, open_kv_store, worker_options
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.loader import load_model
from moeserve.model.tokenizer import Tokenizer
from moeserve.stages.runner import ModelRunner
from moeserve.stages.step_plan import StepPlan

if TYPE_CHECKING:
    from moeserve.coordinator.executor import Launcher

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    max_in_flight: int = 0  # most batches in flight at once (pipeline parallelism)
    run_s: float = 0.0  # seconds inside the runner's submit (the model itself, in one process), part of
    # the "schedule_submit" phase: the rest of that phase is the coordinator's own work
    step_times: list[float] = field(default_factory=list)
    # seconds the engine spent in each part of its steps: where a step's time goes (see moeserve bench)
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("schedule_submit", "wait_logits", "sample", "process"), 0.0))


@dataclass
class _Batch:
    """A step plan submitted to the runner whose logits have not been collected yet."""

    sched: SchedulerOutput
    to_sample: list[Request]
    handle: Any


def kv_cache_blocks(config: EngineConfig, per_token: int) -> int:
    """Capacity of the latent cache in blocks, from the memory budget (``per_token``: bytes one token
    takes in the cache of the rank holding the most layers); CacheBudgetError (a UserError) if not one."""
    budget, source = config.kv_cache_memory, "--kv-cache-memory"
    if not budget:
        free = free_device_memory(config.torch_device)
        budget = int(free * config.gpu_memory_utilization) if free is not None else DEFAULT_CPU_KV_BYTES
        source = "the free device memory x --gpu-memory-utilization" if free is not None else "the CPU default"
    return blocks_in_budget(budget, config.effective_block_size, per_token, source)


def distributed_runner(config: EngineConfig, model_config: ModelConfig, launcher: Launcher | None = None):
    """Plan the layout, size the cache, and start the stage workers of one replica: on this machine, or,
    with a cluster ``launcher`` (launch/cluster.py), across the nodes of a cluster."""
    from moeserve.coordinator.executor import DistributedExecutor, ReplicaLayout
    from moeserve.coordinator.plan import make_plan, parse_pp_layers

    dims = config.parallel_dims
    dtype_bytes = torch.empty((), dtype=config.torch_dtype).element_size()
    pp_layers = parse_pp_layers(config.pp_layers, model_config.num_hidden_layers, dims.pp) \
        if config.pp_layers else None
    plan = make_plan(model_config, dims, dtype_bytes, pp_layers=pp_layers, keep_fp8=config.effective_keep_fp8,
                     placement_file=Path(config.expert_placement) if config.expert_placement else None)
    per_token = max(plan.stage_layers) * model_config.kv_cache_dim * dtype_bytes
    logger.info("latent cache bytes per token: %d on the largest stage (%s)", per_token, dims.describe())
    num_blocks = kv_cache_blocks(config, per_token)
    dtype = dtype_name(config.torch_dtype)
    options = dict(load_format=config.load_format, keep_fp8=config.effective_keep_fp8, seed=config.weights_seed,
                   ep_dispatch=config.ep_dispatch, placement_file=config.expert_placement,
                   max_positions=config.max_model_len, cuda_graphs=config.use_cuda_graphs,
                   max_num_seqs=config.max_num_seqs, warm_up_tokens=config.effective_max_num_batched_tokens,
                   **worker_options(config, per_token))
    layout = ReplicaLayout(str(config.model_path), dims, tuple(plan.stage_layers), dtype, config.device,
                           config.effective_block_size, num_blocks, tuple(options.items()))
    return plan, num_blocks, (launcher or DistributedExecutor.local)(layout)


class Engine:
    def __init__(self, config: EngineConfig, model: DeepseekModel | None = None,
                 tokenizer: Tokenizer | None = None, launcher: Launcher | None = None):
        self.config = config
        if config.seed is None:  # unseeded: a fresh seed each run, logged so that a run can be repeated
            logger.info("sampling seed %d (unseeded)", torch.seed())
        else:
            torch.manual_seed(config.seed)
        self.model: DeepseekModel | None = None
        self.plan = None  # the ParallelPlan of a distributed engine
        if config.is_distributed:
            self.model_config = ModelConfig.from_hf(config.model_path)
            self.config = config = with_redundant_slots(config, self.model_config.n_routed_experts)
        else:
            self.model = model or load_model(config.model_path, config.torch_dtype, config.torch_device,
                                             progress=config.load_progress,
                                             max_positions=config.max_model_len or None,
                                             load_format=config.load_format, keep_fp8=config.effective_keep_fp8,
                                             dummy_seed=config.weights_seed)
            self.model_config = self.model.config
        self.tokenizer = tokenizer
        if tokenizer is None and not config.skip_tokenizer_init:
            self.tokenizer = Tokenizer.from_dir(config.model_path)
        self.max_model_len = config.context_length(self.model_config)  # the rotary tables are built this long
        if self.max_model_len > self.model_config.max_position_embeddings:
            logger.warning("%s", long_context_note(self.model_config, self.max_model_len))
        kv_store = open_kv_store(config)  # before any rank starts: a wrong password stops here
        if self.model is None:
            self.plan, num_blocks, self.runner = distributed_runner(config, self.model_config, launcher)
            stage_layers = list(self.plan.stage_layers)
        else:
            num_blocks = kv_cache_blocks(config, self.model.cache_bytes_per_token())
            self.runner = ModelRunner(self.model, num_blocks, config.effective_block_size, config.torch_device,
                                      cuda_graphs=config.use_cuda_graphs, max_num_seqs=config.max_num_seqs,
                                      max_model_len=self.max_model_len,
                                      warm_up_tokens=config.effective_max_num_batched_tokens)
            logger.info("latent cache bytes per token: %d", self.runner.cache_bytes_per_token)
            stage_layers = [self.model_config.num_hidden_layers]
        per_token = max(stage_layers) * self.model_config.kv_cache_dim * config.torch_dtype.itemsize
        tiers = build_tiers(config, self.model_config.kv_cache_dim, stage_layers, per_token, self.runner, kv_store)
        self.kv = KVCacheManager(num_blocks, config.effective_block_size, tiers=tiers)
        self.expert_load = ExpertLoadMonitor(self.runner, self.model_config, config.expert_load_interval,
                                             self._phy2log(), EplbConfig.of(config))
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.effective_max_num_batched_tokens), self.kv)
        self.sampler = Sampler()
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.model_config.vocab_size)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        # Batches in flight: with pp stages, pp batches keep every stage busy (each batch on another stage).
        self.pipeline_depth = config.pp if self.model is None else 1
        self.in_flight: deque[_Batch] = deque()

    def _phy2log(self) -> torch.Tensor | None:
        """[ep, slots] the expert placement of a distributed engine (None: one slot per expert)."""
        if self.plan is None or self.plan.dims.ep <= 1:
            return None
        return torch.tensor(self.plan.expert_ids, dtype=torch.long)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        from_tokenizer = self.tokenizer.eos_token_ids if self.tokenizer is not None else ()
        return from_tokenizer or self.model_config.eos_token_ids

    # ---- requests ----
    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None) -> Request:
        """Queue a request; raises RequestError at once if it can never be served."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestError("a request needs a prompt or prompt_token_ids")
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: send prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        params = params or SamplingParams()
        self._validate(prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params)
        req.detokenizer = self.outputs.detokenizer(req.prompt_token_ids)
        self.outputs.grammar(req)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                               f"exceeds the model's context length {self.max_model_len}")
        if total > self.kv.capacity_tokens:
            raise RequestError(f"prompt + max_tokens = {total} tokens exceeds the whole latent cache "
                               f"({self.kv.capacity_tokens} tokens)")

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its cache blocks at once. False if it is unknown or already done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.remove(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, "abort"
        return True

    def check_workers(self) -> None:
        """Raise WorkerError if a stage worker has died (nothing to check in one process)."""
        check = getattr(self.runner, "check_alive", None)
        if check is not None:
            check()
        self.expert_load.idle()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.in_flight)

    def close(self) -> None:
        """Stop stage workers, if any, and the KV store's writer (idempotent)."""
        if self.kv.tiers is not None:
            self.kv.tiers.close()
        shutdown = getattr(self.runner, "shutdown", None)
        if shutdown is not None:
            shutdown()
            self.runner.shutdown = lambda: None  # type: ignore[method-assign]

    # ---- the step ----
    def step(self) -> list[RequestOutput]:
        """Run one batch: fill the pipeline, then finish its oldest batch. Returns that batch's outputs."""
        t0 = time.perf_counter()
        self._fill_pipeline()                                              # 1. schedule and submit
        if not self.in_flight:
            return []
        batch = self.in_flight.popleft()
        t1 = time.perf_counter()
        # 2. the model's logits, sampled on the engine's device (stage workers send them to the host)
        logits = self.runner.collect(batch.handle).to(self.config.torch_device).float()
        t2 = time.perf_counter()
        self.scheduler.advance(batch.sched)
        live = [i for i, r in enumerate(batch.to_sample) if not r.is_finished]  # drop rows aborted in flight
        to_sample = [batch.to_sample[i] for i in live]
        if len(live) < len(batch.to_sample):
            logits = logits[torch.tensor(live, dtype=torch.long, device=logits.device)]
        batch_params = make_sampling_batch(                                # 3. sample
            [r.params for r in to_sample], [r.output_token_ids for r in to_sample],
            [r.prompt_token_ids for r in to_sample], [r.generator for r in to_sample], logits.device,
            eos_token_ids=self.eos_token_ids, token_bitmask=self.outputs.bitmask(to_sample))
        sampled = self.sampler.sample(logits, batch_params)
        t3 = time.perf_counter()
        outputs = self._process(to_sample, sampled)                        # 4. process outputs
        t4 = time.perf_counter()
        self._record(batch.sched, to_sample, (t0, t1, t2, t3, t4))         # 5. statistics
        return outputs

    def _fill_pipeline(self) -> None:
        """Submit batches until ``pipeline_depth`` are in flight or nothing more can run now.

        With several in flight, each takes about 1/depth of the unfinished requests, so that the stages of
        the pipeline work on different batches at the same time."""
        while len(self.in_flight) < self.pipeline_depth:
            busy = frozenset(s.request.request_id for b in self.in_flight for s in b.sched.scheduled)
            cap = None
            if self.pipeline_depth > 1:
                unfinished = len(self.scheduler.running) + len(self.scheduler.waiting)
                cap = max(1, math.ceil(unfinished / self.pipeline_depth))
            sched = self.scheduler.schedule(busy, cap)
            if sched.is_empty:
                return
            to_sample = [s.request for s in sched.scheduled if s.completes_sequence]
            plan = self._plan(sched)
            start = time.perf_counter()
            handle = self.runner.submit(plan)
            self.stats.run_s += time.perf_counter() - start
            self.in_flight.append(_Batch(sched, to_sample, handle))
            self.stats.max_in_flight = max(self.stats.max_in_flight, len(self.in_flight))

    def _plan(self, sched: SchedulerOutput) -> StepPlan:
        token_ids: list[int] = []
        for s in sched.scheduled:
            r = s.request
            token_ids.extend(r.token_ids[r.num_computed_tokens:r.num_computed_tokens + s.num_new_tokens])
        return StepPlan(
            token_ids=token_ids, query_lens=[s.num_new_tokens for s in sched.scheduled],
            num_computed=[s.request.num_computed_tokens for s in sched.scheduled],
            block_tables=[list(s.block_table.block_ids) for s in sched.scheduled],
            sample_rows=[i for i, s in enumerate(sched.scheduled) if s.completes_sequence])

    def _process(self, reqs: list[Request], sampled) -> list[RequestOutput]:
        now = time.monotonic()
        token_ids = sampled.token_ids.tolist()
        logprobs = sampled.logprobs.tolist()
        top = sampled.top_logprobs
        outputs = []
        for row, req in enumerate(reqs):
            top_row = None
            if top is not None and req.params.logprobs:
                n = req.params.logprobs
                top_row = dict(zip(top[1][row, :n].tolist(), top[0][row, :n].tolist()))
            out = self.outputs.process(req, token_ids[row], logprobs[row], top_row, now, self.max_model_len)
            if req.is_finished:
                self.scheduler.remove(req)
                self.requests.pop(req.request_id, None)
            outputs.append(out)
        return outputs

    def _record(self, sched: SchedulerOutput, sampled: list[Request], times: tuple[float, ...]) -> None:
        self.stats.num_steps += 1
        self.stats.num_preemptions += len(sched.preempted)
        self.stats.num_generated_tokens += len(sampled)
        self.stats.step_times.append(times[-1] - times[0])
        if self.kv.tiers is not None:  # the cost rule's prefill speed
            self.kv.tiers.observe_step(sched.num_batched_tokens, times[-1] - times[0])
        self.expert_load.on_step(self.stats.num_steps)
        for phase, start, end in zip(self.stats.phase_s, times, times[1:]):
            self.stats.phase_s[phase] += end - start
        if sched.preempted:
            logger.info("preempted %d request(s) (cache full); they will be recomputed", len(sched.preempted))

    # ---- convenience ----
    def generate(self, prompts: list[str | list[int]] | list[str] | list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[RequestOutput]:
        """Run prompts as one continuous batch to completion; returns the final output of each, in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            rid = f"gen-{id(prompts)}-{i}"
            if isinstance(prompt, str):
                self.add_request(rid, prompt=prompt, params=p)
            else:
                self.add_request(rid, prompt_token_ids=list(prompt), params=p)  # type: ignore[arg-type]
            ids.append(rid)
        finals: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    finals[out.request_id] = out
        return [finals[i] for i in ids]
