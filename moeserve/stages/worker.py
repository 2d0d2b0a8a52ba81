"""The worker process of one rank: its layers, its experts, its cache; runs the step plans it is sent.

Started by the coordinator as ``python -m moeserve.stages.worker SPEC_JSON``. It joins torch.distributed,
loads only its share of the checkpoint, reports ``ReadyMsg``, then for each ``StepPlanMsg``: (1) receive
hidden states from the previous stage (or embed the tokens), (2) run its layers, (3) send the hidden states
on (or, on the last stage's first tp rank, send the logits back to the coordinator).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass

import torch
import zmq

from moeserve.comm.groups import RankGroups, init_groups, recv_hidden, send_hidden
from moeserve.comm.messages import ErrorMsg, LogitsMsg, ReadyMsg, ShutdownMsg, StepPlanMsg, decode, encode
from moeserve.comm.topology import ParallelDims
from moeserve.coordinator.config import DTYPES
from moeserve.experts.moe import ExpertPlacement
from moeserve.model.deepseek import ModelSlice
from moeserve.model.loader import load_model
from moeserve.stages.runner import ModelRunner, StepPlan

logger = logging.getLogger(__name__)


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
    init_method: str  # torch.distributed rendezvous
    plan_addr: str  # ZeroMQ address this rank pulls step plans from
    result_addr: str  # ZeroMQ address results and readiness go to
    timeout_s: float = 60.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        raw = json.loads(text)
        raw["stage_layers"] = tuple(raw["stage_layers"])
        return cls(**raw)

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(pp=self.pp, tp=self.tp, ep=self.ep)

    def model_slice(self, groups: RankGroups, num_experts: int) -> ModelSlice:
        coord = self.dims.coord(self.rank)
        start = sum(self.stage_layers[:coord.pp_stage])
        end = start + self.stage_layers[coord.pp_stage]
        placement = (ExpertPlacement.contiguous(num_experts, coord.tp_rank, self.tp)
                     if self.ep > 1 and num_experts else None)
        return ModelSlice(start, end, sum(self.stage_layers), placement, groups.tp,
                          expert_tp=self.dims.experts_tensor_parallel)


class StageWorker:
    def __init__(self, spec: WorkerSpec):
        from moeserve.model.config import ModelConfig

        self.spec = spec
        self.device = torch.device(spec.device)
        self.groups = init_groups(spec.rank, spec.dims, self.device, spec.init_method, spec.timeout_s)
        config = ModelConfig.from_hf(spec.model)
        model = load_model(spec.model, DTYPES[spec.dtype], self.device,
                           spec.model_slice(self.groups, config.n_routed_experts))
        self.runner = ModelRunner(model, spec.num_blocks, spec.block_size, self.device)
        self.loaded_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.reports_logits = self.groups.next_rank is None and self.groups.tp.rank == 0

    def run_step(self, msg: StepPlanMsg) -> torch.Tensor | None:
        plan = StepPlan(msg.token_ids, msg.query_lens, msg.num_computed, msg.block_tables, msg.sample_rows)
        model = self.runner.model
        h = None
        if self.groups.prev_rank is not None:                                   # 1. receive
            shape = (len(plan.token_ids), model.config.hidden_size)
            h = recv_hidden(shape, model.dtype, self.device, self.groups.prev_rank)
        logits, h = self.runner.execute_stage(plan, h)                          # 2. run
        if self.groups.next_rank is not None:                                   # 3. send on
            send_hidden(h, self.groups.next_rank)
        return logits

    def serve(self, ctx: zmq.Context) -> None:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.connect(self.spec.plan_addr)
        push.connect(self.spec.result_addr)
        push.send(encode(ReadyMsg(self.spec.rank, self.loaded_bytes, len(self.runner.model.layers))))
        while True:
            msg = decode(pull.recv())
            if isinstance(msg, ShutdownMsg):
                return
            logits = self.run_step(msg)
            if self.reports_logits and logits is not None:
                push.send(encode(LogitsMsg.from_tensor(msg.step_id, self.spec.rank, logits)))


def main(argv: list[str] | None = None) -> int:
    spec = WorkerSpec.from_json((argv or sys.argv[1:])[0])
    logging.basicConfig(level=logging.WARNING, format=f"[rank {spec.rank}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, spec.pp * spec.tp)))
    ctx = zmq.Context()
    try:
        StageWorker(spec).serve(ctx)
    except Exception as e:  # noqa: BLE001 - report, then exit non-zero
        push = ctx.socket(zmq.PUSH)
        push.connect(spec.result_addr)
        push.send(encode(ErrorMsg(spec.rank, f"{type(e).__name__}: {e}")))
        push.close(linger=2000)
        logger.exception("rank %d failed", spec.rank)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
