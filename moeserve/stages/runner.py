"""ModelRunner: owns a model slice and its latent-cache tensors and runs one step plan (``step_plan.py``)."""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import torch

from moeserve.device_copy import to_device
from moeserve.experts.load_counter import attach_counter
from moeserve.kernels import cpu_build, interpreting, kernels_apply
from moeserve.kvstore.latent_cache import allocate_latent_caches
from moeserve.kvstore.layer_ready import LayerReady
from moeserve.model.attn_metadata import AttnMetadata, MetadataSizes, build_attn_metadata
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.mla import ABSORB_MAX_QUERY
from moeserve.stages.cuda_graph import DecodeGraphs, DraftGraphs
from moeserve.stages.selfcheck import check_fast_path
from moeserve.stages.step_plan import DraftPlan, PaddedTables, StepPlan, decode_rows, fill_pending
from moeserve.stages.warm_up import CPU_PREFILL_TOKENS, on_cpu, warm_up

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: DeepseekModel, num_blocks: int, block_size: int, device: torch.device,
                 cache_dtype: torch.dtype | None = None, cuda_graphs: bool = False, max_num_seqs: int = 256,
                 max_model_len: int = 0, warm_up_tokens: int = 0):
        """``cuda_graphs``: capture the decode step for batch sizes up to ``max_num_seqs`` (CUDA devices
        with the fused kernels only; ``max_model_len`` bounds the block tables the graphs read).
        ``warm_up_tokens``: where the fused kernels run, and for bfloat16 on CPU, a prefill of this many
        tokens at start (on CPU at most ``CPU_PREFILL_TOKENS``, and also a decode step of ``max_num_seqs``
        rows) builds and packs what the kernels build at first use, so that the first request does not pay
        for it (``stages/warm_up.py``)."""
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.padded_tables = PaddedTables()  # the steps' block tables as one array, row by row as they change
        self.cache_dtype = cache_dtype or model.dtype
        fast = kernels_apply(device)
        warm_cpu = bool(warm_up_tokens) and on_cpu(device, model.dtype)
        if device.type == "cuda":  # one GEMM for each attention's query and latent projections
            model.fuse_input_projections()
        layer_ids = [int(k) for k in model.layers]
        # with the fast path or a CPU warm-up, one spare block past the manager's: a graph's padding rows, the
        # start-up check and the warm-up write there
        self.kv_caches = allocate_latent_caches(layer_ids, num_blocks + int(fast or warm_cpu), block_size,
                                                model.config.kv_cache_dim, self.cache_dtype, device)
        self.flat_caches = {i: c.view(-1, c.shape[-1]) for i, c in self.kv_caches.items()}
        # the MTP module's latent cache (same block layout), and the hidden states its passes read: the last
        # step's output [T, hidden] and the last pass's sampled outputs [S, hidden]
        self.mtp_cache: torch.Tensor | None = None
        if model.mtp is not None:
            mtp_id = model.config.mtp_layer_id
            self.mtp_cache = allocate_latent_caches([mtp_id], num_blocks + int(fast or warm_cpu), block_size,
                                                    model.config.kv_cache_dim, self.cache_dtype, device)[mtp_id]
        self.step_hidden: torch.Tensor | None = None
        self.layer_ready: LayerReady | None = None  # this rank's layer-wise loads (its KvWorker's), if any
        self.draft_hidden: torch.Tensor | None = None
        self.expert_load = attach_counter(model, device)  # routed tokens per expert of this slice's MoE layers
        logger.info("latent cache: %d blocks x %d tokens, %d bytes per token (%d layers x %d values)",
                    num_blocks, block_size, self.cache_bytes_per_token, len(layer_ids),
                    model.config.kv_cache_dim)
        self.graphs: DecodeGraphs | None = None
        self.draft_graphs: DraftGraphs | None = None  # the MTP module's passes (speculative decoding)
        self.fast_path_error: str | None = None  # why the fused kernels are off, where they were to run
        # with the fused kernels, short prefill chunks over long contexts run as decode rows (a CUDA graph where
        # one fits): StepPlan.short_chunks_as_rows. A prefix hit's 16-token suffix over 8k cached tokens took
        # 27 ms as a prefill chunk on an H100, most of it up-projecting the context (BENCHMARKS.md, issue 21)
        self.short_chunk_rows = fast
        if device.type == "cpu" and model.dtype == torch.bfloat16:
            # build (once per machine) and load the CPU kernels now, not in the first request's step
            logger.info("CPU kernels: %s", cpu_build.status())
        if fast:
            self._start_fast_path(cuda_graphs and device.type == "cuda", max_num_seqs,
                                  max_model_len or model.config.max_position_embeddings, warm_up_tokens)
        else:
            model.use_kernels(False)
            if warm_cpu:
                warm_up(self, self.num_blocks, min(warm_up_tokens, CPU_PREFILL_TOKENS), decode_rows=max_num_seqs)
                self._forget_start_up_load()

    def _start_fast_path(self, cuda_graphs: bool, max_num_seqs: int, max_model_len: int,
                         warm_up_tokens: int) -> None:
        capture = (lambda: self._capture(max_num_seqs, max_model_len)) if cuda_graphs else None
        # what the check turned off and why (None: all on); a kernel that failed is off alone
        self.fast_path_error = check_fast_path(self, self.num_blocks, capture)
        if warm_up_tokens and not interpreting():  # Triton's interpreter (tests) builds nothing to warm up
            warm_up(self, self.num_blocks, warm_up_tokens)
        self._forget_start_up_load()

    def _forget_start_up_load(self) -> None:
        """Zero the expert-load counts of the start-up check and warm-up: they routed no request's tokens."""
        for moe in self.model.moe_layers().values():
            moe.tokens_per_expert.zero_()
        if self.expert_load is not None:
            self.expert_load.logical.zero_()
            self.expert_load.physical.zero_()

    def _capture(self, max_num_seqs: int, max_model_len: int) -> None:
        graphs = DecodeGraphs(self, max_num_seqs, -(-max_model_len // self.block_size), self.num_blocks,
                              keep_hidden=self.mtp_cache is not None)
        graphs.capture()
        self.graphs = graphs
        if self.mtp_cache is not None:
            draft_graphs = DraftGraphs(self, max_num_seqs, -(-max_model_len // self.block_size), self.num_blocks)
            draft_graphs.capture()
            self.draft_graphs = draft_graphs

    @property
    def cache_bytes_per_token(self) -> int:
        return self.model.cache_bytes_per_token(self.cache_dtype)

    def step_inputs(self, plan: StepPlan, with_token_ids: bool = True) -> tuple[AttnMetadata, torch.Tensor | None]:
        """The step's attention metadata and (``with_token_ids``) its token ids [T] long, on the device, copied
        without waiting for its queued work.

        NOTE: a step of decode rows only (every step between prefills) gets its positions, cache slots and
        context lengths from numpy on the host (``decode_rows``, what the CUDA graphs stage too), in one copy
        with its token ids: ``build_attn_metadata`` derives them with a dozen small device ops, on a CPU about
        0.3 ms a step at batch 256."""
        lens = np.array([plan.num_computed, plan.query_lens], dtype=np.int64)  # [2, B]
        padded = self.padded_tables(plan.block_tables)
        tables = to_device(torch.from_numpy(padded), self.device)
        sizes = MetadataSizes.of(lens[0], lens[1])
        num_seqs = lens.shape[1]
        if sizes.num_decode == num_seqs:
            rows = to_device(torch.from_numpy(decode_rows(plan, padded, self.block_size)), self.device)  # [4, B]
            meta = AttnMetadata(
                positions=rows[1], slot_mapping=rows[2], num_decode_tokens=num_seqs, block_size=self.block_size,
                decode_block_tables=tables[:, :-(-sizes.max_decode_context // self.block_size)],
                decode_context_lens=rows[3], logits_index=torch.arange(num_seqs, device=self.device))
            return meta, rows[0] if with_token_ids else None
        dev = to_device(torch.from_numpy(lens), self.device)
        meta = build_attn_metadata(tables, dev[0], dev[1], self.block_size, sizes)
        if not with_token_ids:
            return meta, None
        return meta, to_device(torch.tensor(plan.token_ids, dtype=torch.long), self.device)

    def execute(self, plan: StepPlan, prev_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the whole model for the step; returns float32 logits [len(sample_rows), vocab].
        ``prev_token_ids``: the previous batch's sampled ids on the device, for the plan's placeholders."""
        logits, _ = self.execute_stage(plan, None, prev_token_ids)
        assert logits is not None, "execute() needs a model slice with the LM head"
        return logits

    @torch.inference_mode()
    def execute_stage(self, plan: StepPlan, hidden: torch.Tensor | None,
                      prev_token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run this slice's layers on ``hidden`` [T, hidden] (or on the embedded tokens when None).

        Returns (logits of the sample rows if this slice holds the LM head else None, output hidden states).
        Nothing here reads a value back from the device: the engine queues the next step meanwhile.
        """
        plan = plan.expanded()  # drafts to verify: decode rows
        # the expert-load counts' decode tokens (they come first): those of the plan, not of its short chunks'
        # rows below
        num_decode = plan.num_decode_rows if self.expert_load is not None else 0
        if self.short_chunk_rows:
            plan = plan.short_chunks_as_rows(ABSORB_MAX_QUERY)
        if self.graphs is not None and self.graphs.fits(plan) and not plan.wait_loads:
            if self.expert_load is not None:
                self.expert_load.begin_step(num_decode)
            out = self.graphs.run(plan, hidden, prev_token_ids)
            if not self.model.slice.has_head:
                return None, out
            if self.mtp_cache is not None:  # the MTP module's next pass reads the step's hidden states
                self.step_hidden = self.graphs.hidden_rows(len(plan.query_lens))
            return out if plan.samples_every_row else out[self._index(plan.sample_rows)], out
        meta, token_ids = self.step_inputs(plan, with_token_ids=hidden is None)
        if self.expert_load is not None:
            self.expert_load.begin_step(num_decode)
        if hidden is None:
            assert token_ids is not None
            fill_pending(token_ids, plan, prev_token_ids)
            hidden = self.model.embed(token_ids)
        ready = self.layer_ready
        before_layer = partial(ready.wait, plan.wait_loads) if ready is not None and plan.wait_loads else None
        h = self.model.forward_layers(hidden, meta, self.flat_caches, before_layer)
        if not self.model.slice.has_head:
            return None, h
        if self.mtp_cache is not None:
            self.step_hidden = h
        rows = meta.logits_index if plan.samples_every_row else meta.logits_index[self._index(plan.sample_rows)]
        return self.model.logits(h[rows]), h

    @torch.inference_mode()
    def draft(self, plan: DraftPlan) -> torch.Tensor:
        """One MTP pass (see ``DraftPlan``); returns float32 logits [len(sample_rows), vocab] of the tokens
        after next. Only on a slice with the LM head and the MTP module. The pass runs as decode rows (each
        row at its position), replayed from a CUDA graph where one fits."""
        assert self.mtp_cache is not None, "this runner holds no MTP module"
        source = self.draft_hidden if plan.chained else self.step_hidden
        assert source is not None, "an MTP pass needs the hidden states of a step before it"
        step, last_rows = plan.decode_form()
        hidden = source[self._index(plan.hidden_rows)]
        if not plan.chained:
            hidden = self.model.norm(hidden)  # the main model's output after its final norm
        rows = self._index(last_rows)
        if self.draft_graphs is not None and self.draft_graphs.fits(step):
            logits = self.draft_graphs.run(step, hidden)
            self.draft_hidden = self.draft_graphs.hidden_rows(len(step.query_lens))[rows]
            return logits[rows]
        meta, token_ids = self.step_inputs(step)
        assert token_ids is not None
        out = self.model.mtp_forward(token_ids, hidden, meta, self.mtp_cache.view(-1, self.mtp_cache.shape[-1]))
        self.draft_hidden = out[rows]
        return self.model.mtp_logits(self.draft_hidden)

    def _index(self, rows: list[int]) -> torch.Tensor:
        return to_device(torch.tensor(rows, dtype=torch.long), self.device)

    def shutdown(self) -> None:
        """Give back the device memory this runner holds: the CUDA graphs and their pool, the latent cache
        and the model (idempotent; the runner cannot run steps afterwards). The caller drops its own
        references to the model and runs ``gc`` / ``torch.cuda.empty_cache()`` (Engine.close)."""
        for graphs in (self.graphs, self.draft_graphs):
            if graphs is not None:
                graphs.release()
        self.graphs = self.draft_graphs = None
        self.kv_caches.clear()
        self.flat_caches.clear()
        self.mtp_cache = self.step_hidden = self.draft_hidden = None
        self.expert_load = None
        self.__dict__.pop("model", None)
