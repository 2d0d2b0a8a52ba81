"""The KV connector: one interface for every movement of latent blocks between the device cache and anything
outside it (vLLM's KVConnector idea). The host tier and the shared store (``tiers.TierManager``) and the
transfer from a prefill instance (``disagg.RemoteConnector``) implement it.

The split of work:

- The scheduler decides (through ``KVCacheManager``): at admission, after the device-cache match, it asks
  the connector for a ``LoadPlan`` of the following blocks (``plan_load``); it allocates device blocks for
  them and hands them over (``begin_load``). The request waits, holding its blocks, until the load is done;
  or, layer-wise (LMCache's mode), it is scheduled at once and the step plan lists the load: each rank runs
  layer L once layer L of the load is in, and the step is dropped (the request recomputed from what did
  arrive) if the load turns out short.
- Every step's loads and saves (blocks newly computed, ``save``) go to the ranks ahead of the step plan
  (``send_ops``, called by the engine before it launches a batch and at the end of each step), as typed
  messages (``KvLoadMsg``, ``KvSaveMsg``).
- The ranks (``KvWorker``) do them: saves at once (they copy blocks the next plan may overwrite), loads on a
  background thread; each rank reports a finished load with a ``KvLoadedMsg``.
- ``finished_loads`` turns the reports (every rank's) into ``LoadDone``: how many blocks, from the first,
  arrived. The cache manager registers those, frees the rest (recomputed), and the request is scheduled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from moeserve.comm.messages import KvLoadedMsg, KvLoadMsg, KvSaveMsg


@dataclass(frozen=True)
class LoadDone:
    request_id: str
    num_blocks: int  # blocks that arrived, from the first (the rest are recomputed)


class LoadPlan(Protocol):
    """A connector's own description of a load it can do (opaque to the cache manager)."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def layerwise(self) -> bool:
        """Whether the load can be layer-wise: the request scheduled at once, each step layer waiting for its
        own blocks (kvstore/layer_ready.py)."""


class KVConnector(Protocol):
    # whether ``plan_load`` may be given one hash more than ``tokens``: the prompt's tail after its full blocks
    # (``prefix.prompt_tail``), a partial block no other request shares (a prefill instance holds it)
    loads_prompt_tail: bool

    def plan_load(self, hashes: Sequence[int], tokens: Sequence[tuple[int, ...]],
                  kv_transfer: str | None) -> LoadPlan | None:
        """How the blocks ``hashes`` (the full blocks after the device match, in order; ``tokens`` theirs)
        can be filled, from the first; None when none can (or it is not worth it). ``kv_transfer``: the
        request's transfer parameters (JSON text), for connectors that load a given request's blocks."""

    def begin_load(self, request_id: str, plan: LoadPlan, blocks: Sequence[int], layerwise: bool = False) -> int:
        """Load the first ``len(blocks)`` blocks of ``plan`` into the device ``blocks`` (sent with the next
        ``send_ops``); a ``LoadDone`` for ``request_id`` follows. ``layerwise`` (only where ``plan.layerwise``):
        the ranks announce each layer as it lands, for steps that list the returned load id."""

    def save(self, blocks: Sequence[int], hashes: Sequence[int], tokens: Sequence[tuple[int, ...]]) -> None:
        """Newly computed full blocks (sent with the next ``send_ops``)."""

    def send_ops(self) -> None:
        """Send the loads and saves recorded since the last call to the ranks, in order."""

    def finished_loads(self) -> list[LoadDone]:
        """Loads every rank has finished since the last call."""

    def wait(self, timeout_s: float) -> None:
        """Block until some rank reports (or ``timeout_s`` passes): the engine has nothing else to run."""

    def observe_step(self, num_tokens: int, seconds: float) -> None: ...

    def snapshot(self) -> dict[str, float | int | list]:
        """Counters for /metrics (plain values)."""

    def close(self) -> None: ...


@dataclass
class PendingLoad:
    """A load sent to the ranks, until every rank has reported it."""

    request_id: str
    num_ranks: int
    replies: dict[int, KvLoadedMsg]  # rank -> its report

    def add(self, reply: KvLoadedMsg) -> bool:
        """Record a rank's report; True once every rank has."""
        self.replies[reply.rank] = reply
        return len(self.replies) == self.num_ranks

    @property
    def num_loaded(self) -> int:
        """Blocks (past the host tier's) that every rank loaded, from the first."""
        return min(r.num_store_loaded for r in self.replies.values())

    @property
    def seconds(self) -> float:
        return max(r.load_s for r in self.replies.values())


class QueuedConnector:
    """What the connectors share: loads and saves queued for the next step, loads pending until every rank
    has reported, finished loads kept while the engine waits. A subclass says how a load is counted
    (``_finish``)."""

    loads_prompt_tail = False

    def __init__(self, num_ranks: int, transport):  # noqa: ANN001 - a KvTransport (kvstore/transport.py)
        self.transport = transport
        self.num_ranks = num_ranks
        self._load_id = 0
        self._ops: list[KvSaveMsg | KvLoadMsg] = []  # to send with the next step
        self._pending: dict[int, tuple[PendingLoad, object]] = {}  # load id -> (its reports, the subclass's)
        self._done: list[LoadDone] = []  # finished while waiting

    def _queue_load(self, msg_of: Callable[[int], KvLoadMsg], request_id: str, state: object) -> int:
        self._load_id += 1
        self._ops.append(msg_of(self._load_id))
        self._pending[self._load_id] = (PendingLoad(request_id, self.num_ranks, {}), state)
        return self._load_id

    def send_ops(self) -> None:
        ops, self._ops = self._ops, []
        for msg in ops:
            self.transport.kv_submit(msg)

    def finished_loads(self) -> list[LoadDone]:
        done, self._done = self._done, []
        return done + self._collect(0.0)

    def wait(self, timeout_s: float) -> None:
        self._done += self._collect(timeout_s)

    def _collect(self, timeout_s: float) -> list[LoadDone]:
        done = []
        for reply in self.transport.kv_poll(timeout_s):
            entry = self._pending.get(reply.load_id)
            if entry is not None and entry[0].add(reply):
                del self._pending[reply.load_id]
                done.append(self._finish(*entry))
        return done

    def _finish(self, pending: PendingLoad, state: object) -> LoadDone:
        raise NotImplementedError
