"""ParallelDims: the one validated value that says which rank does what.

Global ranks are laid out replica-major, then pipeline stage, then tensor-parallel rank::

    rank = replica * (pp * tp) + pp_stage * tp + tp_rank

so the ``tp`` ranks of one stage are consecutive (one node, or one NVLink/HCCS island, in the usual
launch), and a replica is a consecutive block of ``pp * tp`` ranks. Everything else asks this value for
groups and peers; nothing reads a rank or world size from a module global. No torch.distributed here:
process groups are built from these rank lists elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.errors import UserError


class InfeasiblePlanError(UserError, ValueError):
    """This model cannot be laid out on this topology (or in this memory); the message says why."""


@dataclass(frozen=True)
class RankCoord:
    """Where one global rank sits."""

    replica: int
    pp_stage: int
    tp_rank: int


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism of the whole deployment.

    * ``replicas``: full copies of the model (data parallelism across replicas, routed by the router).
    * ``pp``: pipeline stages per replica (contiguous layer ranges).
    * ``tp``: ranks per stage; attention (and dense MLPs, shared experts) are tensor-parallel over them.
    * ``ep``: expert-parallel degree of the MoE layers. ``ep == tp``: each rank of a stage holds a slice of
      the routed experts and tokens move by all-to-all inside the stage. ``ep == 1``: the routed experts
      are tensor-parallel like a dense MLP (their intermediate dim split over the stage's ranks).
    """

    replicas: int = 1
    pp: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("replicas", "pp", "tp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        # NOTE: attention data parallelism (DP attention inside a stage, with an EP group wider than tp,
        # e.g. ep == tp * attn_dp spanning replicas) would add an ``attn_dp`` degree here and widen
        # ``ep_group_ranks``; until then the EP group is either the stage's tp ranks or a single rank.
        if self.ep not in (1, self.tp):
            raise ValueError(f"ep must be 1 (routed experts tensor-parallel) or equal to tp ({self.tp}: "
                             f"experts spread over the ranks of a stage), got ep={self.ep}")

    @classmethod
    def from_args(cls, pp: int, tp: int, ep: int | None = None, replicas: int = 1) -> ParallelDims:
        """From command-line degrees; ``ep=None`` means expert parallelism over the stage (ep = tp)."""
        return cls(replicas=replicas, pp=pp, tp=tp, ep=tp if ep is None else ep)

    # ---- sizes ----
    @property
    def ranks_per_replica(self) -> int:
        return self.pp * self.tp

    @property
    def world_size(self) -> int:
        return self.replicas * self.ranks_per_replica

    @property
    def ep_group_size(self) -> int:
        """Ranks that share one set of routed experts (each holds 1/ep_group_size of them)."""
        return self.ep

    @property
    def experts_tensor_parallel(self) -> bool:
        """True when routed experts are split by intermediate dim over tp rather than by expert."""
        return self.ep == 1 and self.tp > 1

    # ---- rank maps ----
    def coord(self, rank: int) -> RankCoord:
        """Global rank -> (replica, pp_stage, tp_rank)."""
        self._check_rank(rank)
        replica, local = divmod(rank, self.ranks_per_replica)
        stage, tp_rank = divmod(local, self.tp)
        return RankCoord(replica, stage, tp_rank)

    def rank_of(self, replica: int, pp_stage: int, tp_rank: int) -> int:
        """(replica, pp_stage, tp_rank) -> global rank."""
        self._check_range("replica", replica, self.replicas)
        self._check_range("pp_stage", pp_stage, self.pp)
        self._check_range("tp_rank", tp_rank, self.tp)
        return replica * self.ranks_per_replica + pp_stage * self.tp + tp_rank

    def local_rank_in_replica(self, rank: int) -> int:
        """Index of ``rank`` inside its replica (0 .. ranks_per_replica - 1)."""
        self._check_rank(rank)
        return rank % self.ranks_per_replica

    def ep_rank(self, rank: int) -> int:
        """This rank's index in its EP group (which slice of the routed experts it holds)."""
        return self.coord(rank).tp_rank if self.ep > 1 else 0

    def stage_ranks(self, replica: int, stage: int) -> list[int]:
        """The tp ranks of one stage of one replica, in tp-rank order."""
        first = self.rank_of(replica, stage, 0)
        return list(range(first, first + self.tp))

    def replica_ranks(self, replica: int) -> list[int]:
        first = self.rank_of(replica, 0, 0)
        return list(range(first, first + self.ranks_per_replica))

    def tp_group_ranks(self, rank: int) -> list[int]:
        """Ranks this rank all-reduces attention outputs with (its stage)."""
        c = self.coord(rank)
        return self.stage_ranks(c.replica, c.pp_stage)

    def ep_group_ranks(self, rank: int) -> list[int]:
        """Ranks this rank exchanges routed tokens with by all-to-all ([rank] itself when ep == 1)."""
        return self.tp_group_ranks(rank) if self.ep > 1 else [rank]

    def pp_peer(self, rank: int, direction: int) -> int | None:
        """The same tp rank one stage later (+1) or earlier (-1) in the same replica; None past the ends."""
        if direction not in (1, -1):
            raise ValueError(f"direction must be +1 or -1, got {direction}")
        c = self.coord(rank)
        stage = c.pp_stage + direction
        if not 0 <= stage < self.pp:
            return None
        return self.rank_of(c.replica, stage, c.tp_rank)

    def is_first_stage(self, rank: int) -> bool:
        return self.coord(rank).pp_stage == 0

    def is_last_stage(self, rank: int) -> bool:
        return self.coord(rank).pp_stage == self.pp - 1

    def describe(self) -> str:
        return (f"{self.replicas} replica(s) x pp {self.pp} x tp {self.tp} (ep {self.ep}) "
                f"= {self.world_size} rank(s)")

    # ---- checks ----
    def _check_rank(self, rank: int) -> None:
        self._check_range("rank", rank, self.world_size)

    @staticmethod
    def _check_range(name: str, value: int, size: int) -> None:
        if not 0 <= value < size:
            raise ValueError(f"{name} must be in 0..{size - 1}, got {value}")
