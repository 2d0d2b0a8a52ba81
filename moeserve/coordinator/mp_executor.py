"""MultiprocExecutor: the ranks of a replica as processes started here (``--distributed-executor-backend mp``,
the default), and the base of ``launch cluster``'s executor, whose other nodes start their own."""

from __future__ import annotations

import tempfile
from pathlib import Path

from moeserve.coordinator.executor import ReplicaLayout, WorkerError
from moeserve.coordinator.rank_executor import RankExecutor
from moeserve.coordinator.worker_processes import kill_processes, spawn_workers, stop_processes
from moeserve.stages.worker_spec import WorkerSpec


class MultiprocExecutor(RankExecutor):
    def __init__(self, specs: list[WorkerSpec], coord_bind: str, local_specs: list[WorkerSpec] | None = None,
                 env: dict[str, str] | None = None, **timeouts: float):
        """``local_specs``: the ranks to spawn here (default all); ``env``: their environment."""
        self.local_ranks = [s.rank for s in (specs if local_specs is None else local_specs)]
        self.env = env
        self.procs: list = []
        super().__init__(specs, coord_bind, **timeouts)

    @property
    def local_specs(self) -> list[WorkerSpec]:
        """The specs of the ranks spawned here, of their current generation."""
        return [self.specs[r] for r in self.local_ranks]

    @classmethod
    def local(cls, layout: ReplicaLayout) -> MultiprocExecutor:
        """Spawn every rank of one replica on this machine (device index = rank for accelerators)."""
        tmp = Path(tempfile.mkdtemp(prefix="moeserve-"))
        coord = f"ipc://{tmp}/coordinator"
        specs = [layout.spec(r, r, f"file://{tmp}/rendezvous", coord) for r in range(layout.dims.world_size)]
        return cls(specs, coord)

    def _start_ranks(self) -> None:
        self.procs = spawn_workers(self.local_specs, self.env)

    def _failures(self, reported: int | None = None) -> list[WorkerError]:
        return [WorkerError(f"{self._where(spec.rank)} exited with code {proc.returncode}", proc.returncode,
                            rank=spec.rank, node=spec.node)
                for spec, proc in zip(self.local_specs, self.procs)
                if proc.poll() is not None and spec.rank != reported]

    def _kill_ranks(self) -> None:
        kill_processes(self.procs)

    def _stop_ranks(self) -> None:
        stop_processes(self.procs)
