"""What one rank is started with (``WorkerSpec``, JSON on the worker's command line) and the model slice it
holds. Built by the coordinator's executors, read by the worker process (worker.py)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from moeserve.comm.groups import RankGroups
from moeserve.comm.topology import ParallelDims
from moeserve.experts.moe import ExpertPlacement
from moeserve.experts.placement import expert_placement
from moeserve.kvstore.store import WRITE_BUFFER_BYTES
from moeserve.model.deepseek import ModelSlice


@dataclass(frozen=True)
class WorkerSpec:
    rank: int
    pp: int
    tp: int
    ep: int
    model: str
    dtype: str
    device: str
    block_size: int
    num_blocks: int
    stage_layers: tuple[int, ...]  # layers per stage
    init_method: str  # torch.distributed rendezvous (file:// on one node, tcp://MASTER:PORT across nodes)
    coord_addr: str  # the coordinator's ZeroMQ ROUTER: plans come from it, results go to it
    timeout_s: float = 60.0  # every collective's timeout
    node: int = 0  # the node this rank runs on (for error messages)
    preflight_bytes: int = 1 << 20  # payload of the preflight all-reduce / all-to-all; 0 = skip
    num_threads: int = 0  # CPU threads of this rank; 0 = the machine's share (cores / ranks on it)
    load_format: str = "auto"  # auto | dummy (random weights from config.json, seeded by ``seed``)
    keep_fp8: bool = False  # keep FP8 routed experts in float8
    seed: int = 0
    ep_dispatch: str = "allreduce"  # allreduce | alltoall
    placement_file: str = ""  # expert placement (JSON); empty = contiguous
    max_positions: int = 0  # rotary table length; 0 = the model's max_position_embeddings
    cuda_graphs: bool = False  # capture the decode step (CUDA devices; each rank captures its own)
    max_num_seqs: int = 256  # the largest decode batch (rows: a verify step's drafts count) a graph is captured for
    warm_up_tokens: int = 0  # tokens of the warm-up prefill at start (where the fused kernels run)
    mtp: bool = False  # the last stage loads the MTP module and runs its passes (speculative decoding)
    kv_host_blocks: int = 0  # host-tier slots (kvstore/tier_setup.py); 0 = none
    kv_store: str = ""  # the shared store's URL; empty = none
    kv_fingerprint: str = ""  # the model's fingerprint (stored blocks' keys)
    kv_salt: str = ""
    kv_store_timeout_s: float = 1.0
    kv_store_probe_s: float = 5.0
    kv_store_connections: int = 4
    kv_store_write_buffer: int = WRITE_BUFFER_BYTES
    disaggregation_mode: str = ""  # prefill: tp rank 0 serves its stage's layers; decode: ranks pull theirs
    kv_transfer_backend: str = "zmq"
    kv_transfer_addr: str = "tcp://127.0.0.1:0"
    generation: int = 0  # how many times the replica's ranks were restarted (Executor.restart)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        raw = json.loads(text)
        raw["stage_layers"] = tuple(raw["stage_layers"])
        return cls(**raw)

    @property
    def identity(self) -> bytes:
        """The rank's ZeroMQ identity at the coordinator: with the generation, so that whatever a rank of an
        earlier generation still sends is told apart (and dropped)."""
        return f"rank-{self.rank}.{self.generation}".encode()

    def next_generation(self) -> WorkerSpec:
        """This rank's spec for the next restart: a new generation, and a rendezvous of its own where the old
        one cannot be used again (a file store's file)."""
        generation = self.generation + 1
        init = self.init_method
        if init.startswith("file://"):
            init = f"{init.rsplit('.g', 1)[0] if self.generation else init}.g{generation}"
        return dataclasses.replace(self, generation=generation, init_method=init)

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(pp=self.pp, tp=self.tp, ep=self.ep)

    def model_slice(self, groups: RankGroups, num_experts: int) -> ModelSlice:
        coord = self.dims.coord(self.rank)
        start = sum(self.stage_layers[:coord.pp_stage])
        end = start + self.stage_layers[coord.pp_stage]
        placement = None
        if self.ep > 1 and num_experts:
            per_rank = expert_placement(num_experts, self.ep, Path(self.placement_file) if self.placement_file
                                        else None)
            placement = ExpertPlacement.from_ranks(per_rank, coord.tp_rank)
        expert_tp = self.dims.experts_tensor_parallel
        return ModelSlice(start, end, sum(self.stage_layers), placement, groups.tp, expert_tp=expert_tp,
                          ep_dispatch=self.ep_dispatch if not expert_tp else "allreduce")
