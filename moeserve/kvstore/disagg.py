"""Prefill/decode disaggregation (``--disaggregation-mode prefill|decode``), on the KV connector.

A request goes to a prefill instance with ``kv_transfer_params`` ``{"do_remote_decode": true, "transfer_id":
T}`` and ``max_tokens`` 1: the prefill instance computes the prompt's latents and, when the request finishes,
holds its blocks under T (``PrefillSide``) for a decode instance to pull. The same request then goes to a
decode instance with ``{"transfer_id": T, "remote_addr": <the prefill instance's transfer address>,
"fingerprint": <its model fingerprint>}``: the decode instance's ``RemoteConnector`` loads those blocks
(kvstore/remote.py) as any connector loads a prefix, the prompt's partial last block too, computes the
prompt's last token (a decode row: no prefill chunk stalls the streams it is decoding) and streams the
tokens. A transfer that fails or times out loads nothing: the decode instance computes the prompt itself (a
retry, never a failed request).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from moeserve.comm.messages import KvLoadMsg
from moeserve.kvstore.block_format import BlockLayout
from moeserve.kvstore.connector import LoadDone, LoadPlan, PendingLoad, QueuedConnector
from moeserve.kvstore.nixl_transfer import NixlAgent
from moeserve.kvstore.remote import TransferStats, layout_fields, send_release
from moeserve.kvstore.transfer_server import HeldTransfers, KvBlockServer, KvTransferServer
from moeserve.kvstore.transport import KvTransport

logger = logging.getLogger(__name__)

MODES = ("prefill", "decode")
BACKENDS = ("zmq", "nixl")


class KvTransferError(ValueError):
    """Transfer parameters that cannot be used (malformed, or for another model): the request is refused."""


@dataclass(frozen=True)
class KvTransferParams:
    """A request's ``kv_transfer_params`` (vLLM's name): to a prefill instance ``do_remote_decode`` and the
    ``transfer_id`` to hold its blocks under; to a decode instance the ``transfer_id``, the prefill
    instance's ``remote_addr`` and its model ``fingerprint``."""

    transfer_id: str
    do_remote_decode: bool = False
    remote_addr: str = ""
    fingerprint: str = ""

    @classmethod
    def from_dict(cls, body: Any) -> KvTransferParams:
        if not isinstance(body, dict):
            raise KvTransferError("kv_transfer_params must be an object")
        unknown = sorted(set(body) - set(cls.__dataclass_fields__))
        if unknown:
            raise KvTransferError(f"kv_transfer_params: unknown field(s) {', '.join(map(str, unknown))}")
        tid = body.get("transfer_id")
        if not isinstance(tid, str) or not 0 < len(tid) <= 128:
            raise KvTransferError("kv_transfer_params.transfer_id must be a string of 1-128 characters")
        for name in ("remote_addr", "fingerprint"):
            if not isinstance(body.get(name, ""), str):
                raise KvTransferError(f"kv_transfer_params.{name} must be a string")
        if not isinstance(body.get("do_remote_decode", False), bool):
            raise KvTransferError("kv_transfer_params.do_remote_decode must be a bool")
        params = cls(**body)
        if params.do_remote_decode == bool(params.remote_addr):
            raise KvTransferError("kv_transfer_params: either do_remote_decode (to a prefill instance) or "
                                  "remote_addr (to a decode instance)")
        if params.remote_addr and not params.remote_addr.startswith("tcp://"):
            raise KvTransferError("kv_transfer_params.remote_addr must be tcp://host:port")
        return params

    @classmethod
    def from_json(cls, text: str) -> KvTransferParams:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise KvTransferError(f"kv_transfer_params is not JSON: {e}") from None

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def check_transfer(text: str, mode: str, fingerprint: str) -> KvTransferParams:
    """A request's transfer parameters, checked against this instance's role and model."""
    params = KvTransferParams.from_json(text)
    if mode not in MODES:
        raise KvTransferError("kv_transfer_params given to an instance without --disaggregation-mode")
    if mode == "prefill" and not params.do_remote_decode:
        raise KvTransferError("a prefill instance takes kv_transfer_params with do_remote_decode")
    if mode == "decode":
        if not params.remote_addr:
            raise KvTransferError("a decode instance takes kv_transfer_params with remote_addr")
        if params.fingerprint != fingerprint:
            raise KvTransferError(f"model fingerprint mismatch: the prefill instance serves {params.fingerprint!r}, "
                                  f"this decode instance {fingerprint!r}: both roles must load the same model")
    return params


@dataclass(frozen=True)
class RemotePlan:
    remote_addr: str
    transfer_id: str
    hashes: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)

    @property
    def layerwise(self) -> bool:
        return False  # a pull is not layer-ordered: the request waits for it


class RemoteConnector(QueuedConnector):
    """The decode side: a request's prompt blocks come from the prefill instance that computed them, its tail
    included (the block past the last full one: ``prefix.prompt_tail``), so that the decode instance computes
    only the prompt's last token, in a decode row of its next step rather than a prefill chunk beside them."""

    loads_prompt_tail = True

    def __init__(self, transport: KvTransport, layout: BlockLayout, timeout_s: float, backend: str = "zmq"):
        super().__init__(transport.num_ranks, transport)
        self.layout = layout
        self.timeout_s = timeout_s
        self.backend = backend
        self.stats = TransferStats("decode")
        self._release_sockets: dict = {}  # prefill transfer address -> a DEALER (kvstore/remote.py)

    def plan_load(self, hashes: Sequence[int], tokens: Sequence[tuple[int, ...]],
                  kv_transfer: str | None) -> RemotePlan | None:
        if not kv_transfer or not hashes:
            return None
        params = KvTransferParams.from_json(kv_transfer)  # checked at admission (check_transfer)
        return RemotePlan(params.remote_addr, params.transfer_id, tuple(hashes))

    def begin_load(self, request_id: str, plan: LoadPlan, blocks: Sequence[int], layerwise: bool = False) -> int:
        assert isinstance(plan, RemotePlan) and not layerwise
        hashes = [f"{h:032x}" for h in plan.hashes[:len(blocks)]]
        return self._queue_load(lambda load_id: KvLoadMsg(
            load_id, [], [], [], [], [], remote_addr=plan.remote_addr, remote_id=plan.transfer_id,
            remote_hashes=hashes, remote_fingerprint=self.layout.fingerprint, remote_blocks=list(blocks),
            remote_timeout_s=self.timeout_s, remote_backend=self.backend), request_id, plan)

    def _finish(self, pending: PendingLoad, state: object) -> LoadDone:
        """Every rank has its layers (or failed): the prefill instance's hold can go."""
        assert isinstance(state, RemotePlan)
        send_release(self._release_sockets, state.remote_addr, state.transfer_id)
        replies = list(pending.replies.values())
        errors = sorted({r.error for r in replies if r.error})
        self.stats.record(sum(r.bytes_read for r in replies), pending.seconds, not errors)
        if errors:
            logger.warning("KV transfer for %s failed (%s): computing the prompt here", pending.request_id,
                           "; ".join(errors))
        return LoadDone(pending.request_id, pending.num_loaded)

    def save(self, blocks: Sequence[int], hashes: Sequence[int], tokens: Sequence[tuple[int, ...]]) -> None:
        """Nothing: a decode instance keeps its blocks in its own prefix cache only."""

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        pass

    def snapshot(self) -> dict[str, float | int | list]:
        return self.stats.snapshot()

    def close(self) -> None:
        for sock in self._release_sockets.values():
            sock.close()
        self.transport.close()


def block_server(caches: dict, layout: BlockLayout, bind: str, backend: str) -> KvBlockServer:
    """A rank's block server (its layers of held blocks), with a NIXL agent for the nixl backend."""
    nixl = NixlAgent([caches[i] for i in sorted(caches)], "prefill") if backend == "nixl" else None
    return KvBlockServer(caches, layout, bind, nixl)


class PrefillSide:
    """The prefill side: holds finished requests' blocks (``HeldTransfers``) and answers at the transfer
    address (``KvTransferServer``); the layers are served by each stage's ``KvBlockServer`` (``sources``:
    the stage workers', or ``local`` for a one-process instance)."""

    def __init__(self, layout: BlockLayout, bind: str, hold_s: float, block_bytes: int,
                 sources: list[tuple[str, int, int]], local: KvBlockServer | None = None):
        self.held = HeldTransfers(hold_s)
        self.local = local
        if local is not None:
            sources = [(local.address, min(local.caches), len(local.caches))]
        self.server = KvTransferServer(layout_fields(layout), self.held, bind, sources, block_bytes)

    @property
    def address(self) -> str:
        return self.server.address

    def snapshot(self) -> dict:
        return self.server.stats.snapshot()

    def close(self) -> None:
        self.server.close()
        if self.local is not None:
            self.local.close()
