"""RankSupervisor: what the engine loop does when a rank of its replica dies, instead of stopping.

The ranks of a replica share one torch.distributed group, which cannot be repaired once a member died (gloo
and NCCL communicators are fixed at creation), so every rank of the replica is replaced together
(``Executor.restart``): the survivors are killed, the next generation loads the weights again and meets on a
fresh rendezvous. The coordinator keeps what each request needs to go on (its prompt, the tokens already
sent, its sampling state); once the new ranks are up, the engine queues every unfinished request again, to be
recomputed from its prompt and sent tokens as a preempted one is (``Engine.restart_ranks``). A stream that was
mid-decode resumes with its next token -- no gap, no duplicate -- or, with ``resume_streams`` off, ends with a
typed, retryable error. A rank that keeps dying is not restarted forever: past ``max_restarts`` failures within
``window_s`` the engine stops, naming the rank and its node.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.executor import RestartUnsupported, WorkerError
from moeserve.coordinator.request import Request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 3  # rank failures restarted within window_s; the next one stops the engine (0: fail-stop)
    window_s: float = 600.0
    resume_streams: bool = True  # streams mid-decode resume (else they end with a typed, retryable error)

    @classmethod
    def of(cls, config: EngineConfig) -> RestartPolicy:
        return cls(config.max_restarts, config.restart_window, config.resume_streams)


class RestartBudget:
    """The failures of the last ``window_s`` seconds: ``allow`` records one and says whether it may be
    restarted (no more than ``max_restarts`` in the window)."""

    def __init__(self, max_restarts: int, window_s: float):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        self.times.append(now)
        while self.times and self.times[0] <= now - self.window_s:
            self.times.popleft()
        return len(self.times) <= self.max_restarts


class StreamInterrupted(RuntimeError):
    """A stream that was mid-decode when a rank died, ended because resuming is off (``--no-resume-streams``):
    the front end's ``engine_error``, retryable (the service is up again)."""

    retryable = True


def rank_label(error: WorkerError) -> tuple[str, str]:
    """(rank, node) of a failure for the metrics' labels; "unknown" where the error does not say."""
    return (str(error.rank) if error.rank is not None else "unknown",
            str(error.node) if error.node is not None else "unknown")


@dataclass
class RecoveryStats:
    """Cumulative figures of one engine's restarts (plain values: they travel in ``EngineSnapshot``)."""

    restarts: dict[str, int]  # "rank/node" -> restarts after that rank's failure
    recovery_s_total: float = 0.0
    last_recovery_s: float = 0.0
    num_resumed: int = 0  # streams mid-decode that went on after a restart
    num_requeued: int = 0  # requests queued or prefilling that were queued again
    num_interrupted: int = 0  # streams ended instead (resume off)


class RankSupervisor:
    def __init__(self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.budget = RestartBudget(policy.max_restarts, policy.window_s)
        self.clock = clock
        self.stats = RecoveryStats({})

    def _admit(self, error: WorkerError) -> None:
        """Raise (the error, said to be final) once the rank failed more often than the policy restarts."""
        if isinstance(error, RestartUnsupported):
            raise error
        if not self.budget.allow(self.clock()):
            p = self.policy
            rank, node = rank_label(error)
            raise WorkerError(f"{error} -- {len(self.budget.times)} rank failures within {p.window_s:g} s, more "
                              f"than --max-restarts {p.max_restarts}: not restarting again (the last: rank {rank} "
                              f"on node {node})", error.exit_code, error.rank, error.node) from error

    def recover(self, restart: Callable[[], list[Request]], error: WorkerError) -> list[Request]:
        """Restart the ranks (``restart``: ``Engine.restart_ranks``) after ``error``, again while new ranks
        fail to come up and the budget allows; returns the requests queued again. Raises WorkerError (the
        last failure, final) once the budget is spent, RestartUnsupported where ranks cannot be restarted."""
        start = self.clock()
        while True:
            self._admit(error)
            rank, node = rank_label(error)
            logger.warning("rank %s (node %s) failed: %s; restarting every rank of the replica", rank, node, error)
            try:
                requests = restart()
            except RestartUnsupported as e:  # fail-stop: the rank's failure is what the engine stops on
                logger.warning("%s", e)
                raise error from None
            except WorkerError as e:  # the new ranks did not come up: another failure
                self._count(rank, node)
                error = e
                continue
            self._count(rank, node)
            break
        seconds = self.clock() - start
        self.stats.last_recovery_s = seconds
        self.stats.recovery_s_total += seconds
        return requests

    def _count(self, rank: str, node: str) -> None:
        self.stats.restarts[f"{rank}/{node}"] = self.stats.restarts.get(f"{rank}/{node}", 0) + 1

    def split(self, requests: list[Request]) -> tuple[list[Request], list[Request]]:
        """The re-queued requests as (going on, to be ended): a stream mid-decode goes on only if resuming is
        on; one that had sent nothing always does (its client cannot tell)."""
        mid_decode = [r for r in requests if r.num_output_tokens > 0]
        ended = [] if self.policy.resume_streams else mid_decode
        self.stats.num_requeued += len(requests) - len(mid_decode)
        self.stats.num_resumed += len(mid_decode) - len(ended)
        self.stats.num_interrupted += len(ended)
        return [r for r in requests if r not in ended], ended
