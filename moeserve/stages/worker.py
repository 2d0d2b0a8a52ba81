"""The worker process of one rank: its layers, its experts, its cache; runs the step plans it is sent.

Started by the coordinator (or, on other nodes, by ``moeserve launch cluster``) as
``python -m moeserve.stages.worker SPEC_JSON``. It joins torch.distributed, times an all-reduce and an
all-to-all over the world (the preflight, rank 0 reports it), loads only its share of the checkpoint,
reports ``ReadyMsg``, then for each ``StepPlanMsg``: (1) receive hidden states from the previous stage (or
embed the tokens), (2) run its layers, (3) send the hidden states on (or, on the last stage's first tp
rank, send the logits back to the coordinator). It keeps its busy time for ``StatsRequestMsg``.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch
import zmq

from moeserve.comm.groups import backend_for, init_groups, recv_hidden, send_hidden
from moeserve.comm.messages import (
    DraftPlanMsg,
    ErrorMsg,
    ExpertLoadMsg,
    ExpertLoadRequestMsg,
    KvLoadMsg,
    KvSaveMsg,
    KvServerMsg,
    LogitsMsg,
    PlacementMsg,
    PlacementReadyMsg,
    PreflightMsg,
    ReadyMsg,
    ShutdownMsg,
    StatsMsg,
    StatsRequestMsg,
    StepPlanMsg,
    decode,
    encode,
)
from moeserve.comm.preflight_bench import sync, time_all_reduce, time_all_to_all
from moeserve.dtypes import DTYPES
from moeserve.kvstore.tier_setup import worker_block_server, worker_mover, worker_nixl
from moeserve.kvstore.transport import KvWorker
from moeserve.model.cpu_info import numa_nodes, rank_cpus
from moeserve.model.loader import load_model
from moeserve.model.weights import weight_specs
from moeserve.stages.expert_mover import ExpertMover
from moeserve.stages.runner import ModelRunner
from moeserve.stages.step_plan import DraftPlan, StepPlan
from moeserve.stages.worker_spec import WorkerSpec

logger = logging.getLogger(__name__)


class StageWorker:
    def __init__(self, spec: WorkerSpec):
        from moeserve.model.config import ModelConfig

        self.spec = spec
        backend_for(spec.device)  # imports torch_npu for npu devices, before torch.device("npu:N") below
        self.device = torch.device(spec.device)
        self.groups = init_groups(spec.rank, spec.dims, self.device, spec.init_method, spec.timeout_s)
        self.preflight = time_collectives(spec.preflight_bytes, self.device, spec.dims.world_size) \
            if spec.preflight_bytes else None
        config = ModelConfig.from_hf(spec.model)
        model = load_model(spec.model, DTYPES[spec.dtype], self.device,
                           spec.model_slice(self.groups, config.n_routed_experts),
                           max_positions=spec.max_positions or None, load_format=spec.load_format,
                           keep_fp8=spec.keep_fp8, dummy_seed=spec.seed, with_mtp=spec.mtp)
        self.runner = ModelRunner(model, spec.num_blocks, spec.block_size, self.device,
                                  cuda_graphs=spec.cuda_graphs, max_num_seqs=spec.max_num_seqs,
                                  max_model_len=spec.max_positions, warm_up_tokens=spec.warm_up_tokens)
        kv_mover = worker_mover(spec, self.runner.kv_caches, config.kv_cache_dim)  # host tier, store, decode role
        self.kv_worker = KvWorker(kv_mover, spec.rank, worker_nixl(spec, kv_mover)) if kv_mover is not None else None
        self.runner.layer_ready = self.kv_worker.ready if self.kv_worker is not None else None
        self.block_server = worker_block_server(spec, self.runner.kv_caches, config.kv_cache_dim)  # prefill role
        self.mover = ExpertMover(self.runner)
        # every tensor filled from the checkpoint (parameters and the router's bias buffer)
        self.loaded_bytes = sum(w.target.numel() * w.target.element_size() for w in weight_specs(model))
        self.reports_logits = self.groups.next_rank is None and self.groups.tp.rank == 0
        self.wire_dtype = model.dtype  # the LM head computes in the model dtype: its logits are exact there
        # busy time is kept once the coordinator first asks for it (moeserve bench): timing a step means
        # waiting for the device, which serving should not pay for
        self.timing = False
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.steps, self.busy_s, self.first_start, self.last_end = 0, 0.0, 0.0, 0.0

    def stats(self) -> StatsMsg:
        return StatsMsg(self.spec.rank, self.steps, self.busy_s, max(0.0, self.last_end - self.first_start))

    def expert_load(self, seq: int) -> ExpertLoadMsg:
        """This rank's cumulative expert-load counters (empty when its stage has no MoE layer)."""
        counter = self.runner.expert_load
        if counter is None:
            empty = torch.zeros(0, 2, 0, dtype=torch.long)
            return ExpertLoadMsg.of(self.spec.rank, seq, [], empty, empty)
        logical, physical = counter.snapshot()
        return ExpertLoadMsg.of(self.spec.rank, seq, list(counter.layer_ids), logical, physical)

    def run_step(self, msg: StepPlanMsg) -> torch.Tensor | None:
        plan = StepPlan(msg.token_ids, msg.query_lens, msg.num_computed, msg.block_tables, msg.sample_rows,
                        num_spec=msg.num_spec, wait_loads=msg.wait_loads)
        model = self.runner.model
        h = None
        if self.groups.prev_rank is not None:                                   # 1. receive
            shape = (len(plan.token_ids), model.config.hidden_size)
            h = recv_hidden(shape, model.dtype, self.device, self.groups.prev_rank)
            if self.timing:
                sync(self.device)  # the busy time below starts once the previous stage's output is here
        start = time.perf_counter()
        logits, h = self.runner.execute_stage(plan, h)                          # 2. run
        if self.timing:
            sync(self.device)  # the busy time is the device's, not the kernel launches'
            end = time.perf_counter()
            self.steps, self.busy_s, self.last_end = self.steps + 1, self.busy_s + end - start, end
            self.first_start = self.first_start or start
        if self.groups.next_rank is not None:                                   # 3. send on
            send_hidden(h, self.groups.next_rank)
        return logits

    def serve(self, sock: zmq.Socket) -> None:
        if self.preflight is not None and self.spec.rank == 0:
            sock.send(encode(self.preflight))
        if self.block_server is not None:
            caches = self.block_server.caches
            sock.send(encode(KvServerMsg(self.spec.rank, self.block_server.address, min(caches), len(caches))))
        sock.send(encode(ReadyMsg(self.spec.rank, self.loaded_bytes, len(self.runner.model.layers))))
        launcher = os.getppid()
        while True:
            self._send_kv_reports(sock)
            busy = self.kv_worker is not None and self.kv_worker.num_pending > 0
            if not sock.poll(5 if busy else 1000):
                if os.getppid() != launcher:  # the launcher died without stopping us: nobody will
                    logger.error("rank %d: the launcher (pid %d) is gone; exiting", self.spec.rank, launcher)
                    return
                continue
            msg = decode(sock.recv())
            if isinstance(msg, ShutdownMsg):
                if self.kv_worker is not None:
                    self.kv_worker.close()  # finishes the queued store writes (bounded)
                if self.block_server is not None:
                    self.block_server.close()
                return
            if isinstance(msg, StatsRequestMsg):
                sock.send(encode(self.stats()))
                if msg.reset:
                    self._reset_stats()
                self.timing = True
                continue
            if isinstance(msg, (KvSaveMsg, KvLoadMsg)):
                assert self.kv_worker is not None, "a KV tier message for a rank without tiers"
                self.kv_worker.submit(msg)
                self._send_kv_reports(sock)
                continue
            if isinstance(msg, ExpertLoadRequestMsg):
                sock.send(encode(self.expert_load(msg.seq)))
                continue
            if isinstance(msg, PlacementMsg):
                self._placement(sock, msg)
                continue
            if isinstance(msg, DraftPlanMsg):
                self._draft(sock, msg)
                continue
            logits = self.run_step(msg)
            if self.reports_logits and logits is not None:
                sock.send_multipart(LogitsMsg.frames(msg.step_id, self.spec.rank, logits, self.wire_dtype),
                                    copy=False)

    def _send_kv_reports(self, sock: zmq.Socket) -> None:
        """The KV loads this rank finished (its loader thread's reports) go to the coordinator."""
        if self.kv_worker is not None:
            for report in self.kv_worker.poll():
                sock.send(encode(report))

    def _draft(self, sock: zmq.Socket, msg: DraftPlanMsg) -> None:
        """An MTP pass: the last stage's ranks run it (the others have nothing to do)."""
        if self.groups.next_rank is not None:
            return
        step = StepPlan(msg.token_ids, msg.query_lens, msg.num_computed, msg.block_tables, msg.sample_rows)
        logits = self.runner.draft(DraftPlan(step, msg.hidden_rows, msg.chained))
        if self.reports_logits:
            sock.send_multipart(LogitsMsg.frames(msg.step_id, self.spec.rank, logits, self.wire_dtype), copy=False)

    def _placement(self, sock: zmq.Socket, msg: PlacementMsg) -> None:
        """A chunk of a layer's new expert placement, between two steps (the same two on every rank)."""
        try:
            seconds, nbytes = self.mover.timed_apply(msg.layer_id, msg.phy2log)
        except Exception as e:  # noqa: BLE001 - the rank keeps serving; the coordinator stops the rebalance
            sock.send(encode(PlacementReadyMsg(self.spec.rank, msg.seq, f"{type(e).__name__}: {e}")))
            return
        sock.send(encode(PlacementReadyMsg(self.spec.rank, msg.seq, seconds=seconds, nbytes=nbytes)))


def coordinator_socket(ctx: zmq.Context, spec: WorkerSpec) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, spec.identity)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(spec.coord_addr)
    return sock


def time_collectives(nbytes: int, device: torch.device, world_size: int) -> PreflightMsg:
    """Time an all-reduce and an all-to-all over the whole world, before any weight is loaded: a node whose
    network is broken or misconfigured shows up here (as an error or a slow figure), not while serving."""
    all_reduce = time_all_reduce(None, nbytes, device, iters=5)
    all_to_all = time_all_to_all(None, nbytes, device, iters=5)
    return PreflightMsg(torch.distributed.get_rank(), world_size, all_reduce.nbytes, all_reduce.seconds,
                        all_to_all.seconds)


def bind_threads(spec: WorkerSpec) -> None:
    """This rank's torch threads: ``num_threads``, or its share of the machine's cores. A CPU rank of a
    one-machine world on a machine of several NUMA nodes is also bound to CPUs of one node
    (``cpu_info.rank_cpus``), so that its threads, and the memory they touch first, stay on that node."""
    ranks = max(1, spec.pp * spec.tp)
    nodes = numa_nodes() if spec.device == "cpu" and spec.init_method.startswith("file://") else {}
    if len(nodes) > 1:
        cpus = rank_cpus(nodes, spec.rank % ranks, ranks)
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(spec.num_threads or len(cpus))
        return
    torch.set_num_threads(spec.num_threads or max(1, torch.get_num_threads() // ranks))


def main(argv: list[str] | None = None) -> int:
    spec = WorkerSpec.from_json((argv or sys.argv[1:])[0])
    logging.basicConfig(level=logging.WARNING, format=f"[rank {spec.rank}] %(levelname)s %(name)s: %(message)s")
    bind_threads(spec)
    ctx = zmq.Context()
    sock = coordinator_socket(ctx, spec)
    try:
        StageWorker(spec).serve(sock)
    except Exception as e:  # noqa: BLE001 - report, then exit non-zero
        sock.send(encode(ErrorMsg(spec.rank, f"{type(e).__name__}: {e}")))
        logger.exception("rank %d failed", spec.rank)
        return 1
    finally:
        sock.close(linger=2000)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
