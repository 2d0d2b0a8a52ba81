"""InProcessExecutor: the one rank of a replica of pp = tp = 1, run by a ``ModelRunner`` in the engine's own
process: ``submit`` queues the step's kernels (on a CPU, runs it) and its handle is the logits tensor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from moeserve.comm.messages import ExpertLoadMsg, StatsMsg
from moeserve.coordinator.executor import Executor, ReplicaLayout
from moeserve.device_copy import HostCopy
from moeserve.dtypes import DTYPES
from moeserve.kvstore.block_format import BlockLayout
from moeserve.kvstore.disagg import block_server
from moeserve.kvstore.mover import BlockMover
from moeserve.kvstore.nixl_transfer import NixlAgent
from moeserve.kvstore.store import WRITE_BUFFER_BYTES, KVStore
from moeserve.kvstore.transfer_server import KvBlockServer
from moeserve.kvstore.transport import KvTransport, LocalTransport
from moeserve.model.deepseek import DeepseekModel
from moeserve.model.loader import load_model
from moeserve.stages.runner import ModelRunner
from moeserve.stages.step_plan import DraftPlan, StepPlan

logger = logging.getLogger(__name__)


def cache_bytes_per_token(model: DeepseekModel) -> int:
    """Latent-cache bytes one token takes on this rank: the model's layers and, with speculative decoding,
    the MTP module's layer."""
    mtp = model.config.kv_cache_dim * torch.empty((), dtype=model.dtype).element_size() if model.mtp is not None else 0
    return model.cache_bytes_per_token() + mtp


class InProcessExecutor(Executor):
    def __init__(self, runner: ModelRunner):
        super().__init__()
        self.runner = runner
        self.num_blocks = runner.num_blocks
        self._tracing = False
        self._trace: torch.Tensor | None = None
        self._load: tuple[HostCopy, tuple[int, ...], int] | None = None  # counters asked for: copy, layers, seq
        self._block_server: KvBlockServer | None = None  # a prefill instance's (kv_block_sources)

    @classmethod
    def launcher(cls, model: DeepseekModel | None = None, progress: bool = False,
                 size_cache: Callable[[int], int] | None = None):
        """A Launcher that loads the model here (or takes ``model``, loaded already) and runs it.
        ``size_cache``: bytes one token takes -> cache blocks, called once the weights are on the device
        (a budget from the free device memory must not count the memory the weights are about to take);
        None: the layout's ``num_blocks``."""
        def launch(layout: ReplicaLayout) -> InProcessExecutor:
            device = torch.device(layout.device)
            loaded = model or load_model(layout.model, DTYPES[layout.dtype], device, progress=progress,
                                         max_positions=layout.option("max_positions") or None,
                                         load_format=layout.option("load_format"),
                                         keep_fp8=layout.option("keep_fp8"), dummy_seed=layout.option("seed"),
                                         with_mtp=layout.option("mtp"))
            num_blocks = layout.num_blocks if size_cache is None else size_cache(cache_bytes_per_token(loaded))
            runner = ModelRunner(loaded, num_blocks, layout.block_size, device,
                                 cuda_graphs=layout.option("cuda_graphs"),
                                 max_num_seqs=layout.option("max_num_seqs"),
                                 max_model_len=layout.option("max_positions"),
                                 warm_up_tokens=layout.option("warm_up_tokens"))
            logger.info("latent cache bytes per token: %d", runner.cache_bytes_per_token)
            return cls(runner)
        return launch

    def submit(self, plan: StepPlan, prev_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.runner.execute(plan, prev_token_ids)
        self._record_trace(plan)
        return logits

    def collect(self, handle: torch.Tensor) -> torch.Tensor:
        return handle

    def draft(self, plan: DraftPlan) -> torch.Tensor:
        return self.runner.draft(plan)

    def stage_stats(self, reset: bool = False) -> list[StatsMsg]:
        return []

    # ---- expert load ----
    def request_expert_load(self, seq: int) -> None:
        """The counters are copied to the host without a sync (``HostCopy``) and handed over by a later
        ``poll_messages`` once the copy has landed: reading them at once would wait for every kernel queued,
        including the next step's, and leave the GPU idle after."""
        counter = self.runner.expert_load
        if counter is None:
            empty = torch.zeros(0, 2, 0, dtype=torch.long)
            self._deliver(ExpertLoadMsg.of(0, seq, [], empty, empty))
            return
        self._load = (HostCopy([counter.logical, counter.physical]), counter.layer_ids, seq)

    def poll_messages(self) -> None:
        if self._load is not None and self._load[0].ready():
            copy, layer_ids, seq = self._load
            self._load = None
            logical, physical = copy.wait()
            self._deliver(ExpertLoadMsg.of(0, seq, list(layer_ids), logical, physical))

    def _deliver(self, msg: Any) -> None:
        sink = self.sinks.get(type(msg))
        if sink is not None:
            sink(msg)

    def trace_experts(self, enabled: bool) -> bool:
        self._tracing = enabled
        return True

    def last_expert_ids(self) -> torch.Tensor | None:
        return self._trace

    def _record_trace(self, plan: StepPlan) -> None:
        """While tracing the engine steps synchronously (``Engine.sync_steps``), so the trace of the latest
        submit belongs to the batch it finishes next. A sampled row's expert ids are those its last position
        was routed to."""
        self._trace = None
        if not self._tracing:  # every step but the tracer's: no walk over the model's layers
            return
        moes = list(self.runner.model.moe_layers().values())
        if moes:
            ends = torch.tensor(plan.query_lens).cumsum(0) - 1  # [B] last position of each sequence
            rows = ends[torch.tensor(plan.sample_rows, dtype=torch.long)]
            ids = [m.last_expert_ids for m in moes]  # each [T, top_k] of the latest forward pass
            self._trace = torch.stack([t[rows.to(t.device)].cpu() for t in ids if t is not None], dim=1)

    # ---- messages ----
    def broadcast(self, msg: Any) -> None:
        raise ValueError(f"one process has no ranks to send {type(msg).__name__} to (expert placements need "
                         "expert parallelism over several ranks)")

    def kv_transport(self, layout: BlockLayout, num_host_blocks: int, store: KVStore | None,
                     read_threads: int = 4, nixl: bool = False, write_buffer: int = WRITE_BUFFER_BYTES) -> KvTransport:
        mover = BlockMover(self.runner.kv_caches, layout, num_host_blocks, store, read_threads=read_threads,
                           write_queue_bytes=write_buffer)
        transport = LocalTransport(mover, NixlAgent(mover.caches, "decode") if nixl else None)
        self.runner.layer_ready = transport.worker.ready  # layer-wise loads: the steps wait on their layers
        return transport

    def kv_block_sources(self, layout: BlockLayout, bind_host: str, backend: str) -> list[tuple[str, int, int]]:
        if self._block_server is None:
            self._block_server = block_server(self.runner.kv_caches, layout, f"{bind_host}:*", backend)
        caches = self._block_server.caches
        return [(self._block_server.address, min(caches), len(caches))]

    # ---- health ----
    def check_alive(self) -> None:
        """Nothing to check: the rank is this process."""

    def shutdown(self) -> None:
        if self._block_server is not None:
            self._block_server.close()
            self._block_server = None
        self.runner.shutdown()
