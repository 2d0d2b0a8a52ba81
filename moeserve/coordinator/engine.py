"""The serving engine of one replica: scheduler, latent cache, executor (the ranks that run the model), sampler.

This file builds the engine and takes its requests; ``Engine.step()`` and async scheduling
(``EngineConfig.async_scheduling``, on for CUDA devices) are in ``engine_step.py``.
"""

from __future__ import annotations

import gc
import logging
from collections import deque
from typing import TYPE_CHECKING

import torch

from moeserve.coordinator.config import EngineConfig, long_context_note
from moeserve.coordinator.engine_setup import default_launcher, replica_layout, with_redundant_slots
from moeserve.coordinator.engine_spec_step import SpeculativeStep
from moeserve.coordinator.executor import ReplicaLayout, RestartUnsupported
from moeserve.coordinator.load_monitor import ExpertLoadMonitor
from moeserve.coordinator.outputs import OutputProcessor, RequestOutput
from moeserve.coordinator.rebalancer import EplbConfig
from moeserve.coordinator.request import Request, RequestError, RequestStatus
from moeserve.coordinator.sampling import Sampler, SamplingParams
from moeserve.coordinator.scheduler import Scheduler, SchedulerConfig
from moeserve.coordinator.spec_decode import Speculator
from moeserve.coordinator.spec_policy import SpecPolicy
from moeserve.coordinator.step_batch import EngineStats, SamplingBatchCache, StepBatch
from moeserve.kvstore.block_format import model_fingerprint
from moeserve.kvstore.cache_manager import KVCacheManager
from moeserve.kvstore.disagg import KvTransferError, check_transfer
from moeserve.kvstore.latent_cache import empty_device_cache
from moeserve.kvstore.tier_setup import build_connector, build_prefill_side, open_kv_store
from moeserve.model.config import ModelConfig
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.loader import Checkpoint, MTPError, check_mtp
from moeserve.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from moeserve.coordinator.executor import Executor, Launcher

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineStats"]


def _check_drafter(config: EngineConfig, model_config: ModelConfig, model: DeepseekModel | None) -> None:
    """MTPError (one line) when speculative decoding is asked of a model without its MTP module."""
    ckpt = Checkpoint(config.model_path) if model is None and config.load_format == "auto" else None
    check_mtp(model_config, ckpt)
    if model is not None and model.mtp is None:
        raise MTPError("--speculative-config method 'mtp': the model given to the engine was built without "
                       "its MTP module (load_model(..., with_mtp=True))")


class Engine(SpeculativeStep):
    def __init__(self, config: EngineConfig, model: DeepseekModel | None = None,
                 tokenizer: Tokenizer | None = None, launcher: Launcher | None = None):
        self.config = config
        if config.seed is None:  # unseeded: a fresh seed each run, logged so that a run can be repeated
            logger.info("sampling seed %d (unseeded)", torch.seed())
        else:
            torch.manual_seed(config.seed)
        self.model_config = model.config if model is not None else ModelConfig.from_hf(config.model_path)
        self.config = config = with_redundant_slots(config, self.model_config.n_routed_experts)
        if config.speculative_config is not None:  # before any rank loads: from the config and checkpoint
            _check_drafter(config, self.model_config, model)
        self.tokenizer = tokenizer
        if tokenizer is None and not config.skip_tokenizer_init:
            self.tokenizer = Tokenizer.from_dir(config.model_path)
        self.max_model_len = config.context_length(self.model_config)  # the rotary tables are built this long
        if self.max_model_len > self.model_config.max_position_embeddings:
            logger.warning("%s", long_context_note(self.model_config, self.max_model_len))
        kv_store = open_kv_store(config)  # before any rank starts: a wrong password stops here
        # the parallel plan: the layer split and expert placement of several ranks (None for one)
        self.parallel_plan, layout = replica_layout(config, self.model_config)
        self.executor: Executor = (launcher or default_launcher(config, model))(layout)
        self._layout: ReplicaLayout = layout
        self._kv_store = kv_store
        self._build_cache_state()
        self.prefill_side = build_prefill_side(config, self.model_config.kv_cache_dim, list(layout.stage_layers),
                                               self.executor)
        self.fingerprint = model_fingerprint(config.model_path, config.load_format, config.weights_seed) \
            if config.disaggregation_mode else ""
        spec = config.speculative_config
        self.sampler = Sampler()
        self.sampling_batches = SamplingBatchCache()
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.model_config.vocab_size)
        self.speculator = Speculator(spec, self.sampler, self.outputs.eos_token_ids, config.torch_device) \
            if spec else None
        self.spec_policy = SpecPolicy(spec.probe_interval) if spec else None
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        # Batches in flight: with pp stages, pp batches keep every stage busy (each batch on another stage);
        # with async scheduling, the batch launched by the step before (sampled, not yet processed).
        self.pipeline_depth = config.pp if spec is None else 1  # a speculative step drafts from the one before
        self.in_flight: deque[StepBatch] = deque()
        self.async_scheduling = config.effective_async_scheduling
        # set by a caller that reads the executor's state of each step right after it (the expert tracer of
        # async_engine.py): steps then run synchronously
        self.sync_steps = False
        self._sync_request_ids: set[str] = set()  # requests whose sampling reads their outputs so far
        self._step_start = 0.0
        self._processed: list[RequestOutput] = []  # the outputs the current step has processed so far

    def _build_cache_state(self) -> None:
        """What the engine knows of its ranks' state: the latent cache's blocks (with its KV connector), the
        scheduler over them, and the expert placement the ranks were started with. Built at start, and again
        once the ranks are restarted (their caches are new and empty, their placement the plan's)."""
        config, layout = self.config, self._layout
        stage_layers = list(layout.stage_layers)
        per_token = max(stage_layers) * self.model_config.kv_cache_dim * config.torch_dtype.itemsize
        connector = build_connector(config, self.model_config.kv_cache_dim, stage_layers, per_token, self.executor,
                                    self._kv_store)
        self.kv = KVCacheManager(self.executor.num_blocks or layout.num_blocks, config.effective_block_size,
                                 connector=connector)
        self.expert_load = ExpertLoadMonitor(self.executor, self.model_config, config.expert_load_interval,
                                             self._phy2log(), EplbConfig.of(config))
        spec = config.speculative_config
        # NOTE: no layer-wise loads under speculative decoding: its verify step has no place to drop a row
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.effective_max_num_batched_tokens,
                                                   spec.num_lookahead_tokens if spec else 0,
                                                   config.kv_layerwise and spec is None), self.kv)

    def restart_ranks(self) -> list[Request]:
        """After a rank died (the step raised WorkerError): fresh ranks (``Executor.restart``), an empty cache,
        and every unfinished request queued again, oldest first, to be recomputed from its prompt and the
        tokens it has -- as a preempted one is -- so that it goes on where it stopped, with its sampling state
        (seeded generator, grammar, detokenizer) as it was. Returns those requests. RestartUnsupported for a
        disaggregated instance (the blocks it held for, or pulled from, another instance are gone)."""
        if self.config.disaggregation_mode:
            raise RestartUnsupported(f"a {self.config.disaggregation_mode} instance does not restart its ranks")
        self.in_flight.clear()
        if self.kv.connector is not None:
            self.kv.connector.close()
        self.executor.restart()
        requests = sorted(self.requests.values(), key=lambda r: r.arrival_time)
        for req in requests:
            req.status, req.num_computed_tokens, req.num_output_placeholders = RequestStatus.WAITING, 0, 0
            req.spec_token_ids, req.spec_probs = [], None
        self._build_cache_state()
        for req in requests:
            self.scheduler.add(req)
        return requests

    def take_processed(self) -> list[RequestOutput]:
        """The outputs a step had processed before it raised (a rank died after them): they stand."""
        outputs, self._processed = self._processed, []
        return outputs

    def _phy2log(self) -> torch.Tensor | None:
        """[ep, slots] the expert placement of a distributed engine (None: one slot per expert)."""
        if self.parallel_plan is None or self.parallel_plan.dims.ep <= 1:
            return None
        return torch.tensor(self.parallel_plan.expert_ids, dtype=torch.long)

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
        if params.needs_previous_outputs:
            self._sync_request_ids.add(request_id)
        self.scheduler.add(req)
        return req

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer")
        if params.kv_transfer is not None:
            try:
                check_transfer(params.kv_transfer, self.config.disaggregation_mode, self.fingerprint)
            except KvTransferError as e:
                raise RequestError(str(e)) from None
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
        req = self.requests.get(request_id)
        if req is None:
            return False
        req.status, req.finish_reason = RequestStatus.FINISHED, "abort"
        self._retire(req)
        return True

    def check_workers(self) -> None:
        """Raise WorkerError if a stage worker has died (nothing to check in one process)."""
        self.executor.check_alive()
        self.expert_load.idle()
        self._kv_step_end()  # idle: saves still queued go out; blocks decode instances pulled are freed

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.in_flight)

    def close(self) -> None:
        """Stop stage workers, if any, and the KV store's writer, and give the device memory back: the
        executor's ranks (in this process: the model, latent cache and CUDA graphs), and the batches in flight (idempotent; the engine
        cannot step afterwards). A second engine built in the same process then has the whole device."""
        if self.kv.connector is not None:
            self.kv.connector.close()
        if self.prefill_side is not None:
            self.prefill_side.close()
        self.in_flight.clear()
        self.executor.shutdown()
        gc.collect()  # the model's modules hold reference cycles
        empty_device_cache(self.config.torch_device)

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
