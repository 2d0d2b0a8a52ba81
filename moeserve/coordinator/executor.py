"""DistributedExecutor: runs step plans on stage worker processes (pp x tp ranks on this node).

Same contract as ``ModelRunner.execute``: a ``StepPlan`` in, the sampled rows' logits out. Plans go to every
rank over its own ZeroMQ PUSH socket as typed msgpack messages; the last stage's first tp rank sends the
logits back. A rank that dies or reports an error fails the step with ``WorkerError`` within seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import zmq

from moeserve.comm.messages import ErrorMsg, LogitsMsg, ReadyMsg, ShutdownMsg, StepPlanMsg, decode, encode
from moeserve.comm.topology import ParallelDims
from moeserve.stages.runner import StepPlan
from moeserve.stages.worker import WorkerSpec


class WorkerError(RuntimeError):
    """A stage worker died, timed out or failed."""


class DistributedExecutor:
    def __init__(self, specs: list[WorkerSpec], startup_timeout_s: float = 300.0, step_timeout_s: float = 120.0):
        self.specs = specs
        self.step_timeout_s = step_timeout_s
        self.ctx = zmq.Context()
        self.results = self.ctx.socket(zmq.PULL)
        self.results.bind(specs[0].result_addr)
        self.plans = []
        for spec in specs:
            sock = self.ctx.socket(zmq.PUSH)
            sock.bind(spec.plan_addr)
            self.plans.append(sock)
        env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        self.procs = [subprocess.Popen([sys.executable, "-m", "moeserve.stages.worker", s.to_json()], env=env)
                      for s in specs]
        self.step_id = 0
        self.loaded_bytes: dict[int, int] = {}
        try:
            while len(self.loaded_bytes) < len(specs):
                msg = self._receive(startup_timeout_s, "start")
                if isinstance(msg, ReadyMsg):
                    self.loaded_bytes[msg.rank] = msg.loaded_bytes
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def local(cls, model: str, dims: ParallelDims, stage_layers: list[int], dtype: str, device: str,
              block_size: int, num_blocks: int, timeout_s: float = 60.0) -> DistributedExecutor:
        """Spawn every rank of one replica on this machine (device index = rank for accelerators)."""
        tmp = Path(tempfile.mkdtemp(prefix="moeserve-"))
        specs = [WorkerSpec(rank=r, pp=dims.pp, tp=dims.tp, ep=dims.ep, model=model, dtype=dtype,
                            device=device if device == "cpu" else f"{device.split(':')[0]}:{r}",
                            block_size=block_size, num_blocks=num_blocks, stage_layers=tuple(stage_layers),
                            init_method=f"file://{tmp}/rendezvous", plan_addr=f"ipc://{tmp}/plan-{r}",
                            result_addr=f"ipc://{tmp}/results", timeout_s=timeout_s)
                 for r in range(dims.world_size)]
        return cls(specs)

    def _check_alive(self, reported: int | None = None) -> None:
        """Raise for a dead rank, preferring one that died silently over one that reported an error."""
        dead = [(spec.rank, proc.returncode) for spec, proc in zip(self.specs, self.procs)
                if proc.poll() is not None]
        dead.sort(key=lambda d: d[0] == reported)
        if dead:
            rank, code = dead[0]
            raise WorkerError(f"rank {rank} exited with code {code}")

    def _receive(self, timeout_s: float, what: str) -> object:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.results.poll(500):
                msg = decode(self.results.recv())
                if isinstance(msg, ErrorMsg):
                    time.sleep(0.5)  # a peer's death usually shows up first as another rank's comm error
                    self._check_alive(reported=msg.rank)
                    raise WorkerError(f"rank {msg.rank} failed: {msg.message}")
                return msg
            self._check_alive()
        raise WorkerError(f"no answer from the stage workers within {timeout_s:.0f} s ({what})")

    def execute(self, plan: StepPlan) -> torch.Tensor:
        self.step_id += 1
        frame = encode(StepPlanMsg(self.step_id, plan.token_ids, plan.query_lens, plan.num_computed,
                                   plan.block_tables, plan.sample_rows))
        for sock in self.plans:
            sock.send(frame)
        while True:
            msg = self._receive(self.step_timeout_s, f"step {self.step_id}")
            if isinstance(msg, LogitsMsg) and msg.step_id == self.step_id:
                return msg.tensor()

    def shutdown(self) -> None:
        for sock in self.plans:
            try:
                sock.send(encode(ShutdownMsg("engine closed")), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.ctx.destroy(linger=0)
