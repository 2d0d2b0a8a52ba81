"""Typed messages between the coordinator and stage workers, with one msgpack codec.

Nothing here is ever pickled: every message is a dataclass of plain fields, encoded as a msgpack map with a
``type`` tag, and decoding checks the tag and the field names before building the dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from moeserve.dtypes import DTYPES


class MessageError(ValueError):
    """A frame that is not a valid message."""


@dataclass
class StepPlanMsg:
    step_id: int
    token_ids: list[int]
    query_lens: list[int]
    num_computed: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]
    num_spec: list[int]  # per sequence, draft tokens to verify (empty: none; see stages/step_plan.py)
    wait_loads: list[int]  # layer-wise loads whose blocks the step reads: each layer waits for its own


@dataclass
class DraftPlanMsg:
    """One pass of the MTP module on the last stage (``stages/step_plan.DraftPlan``); its ranks run it, the
    first tp rank sends the logits back as a LogitsMsg with this step id. Other stages ignore it."""

    step_id: int
    token_ids: list[int]
    query_lens: list[int]
    num_computed: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]
    hidden_rows: list[int]
    chained: bool


@dataclass
class LogitsMsg:
    """Logits of a step's sample rows. On the wire the tensor's bytes travel as a second ZeroMQ frame after
    the msgpack header (``frames`` / ``attach``), so that megabytes of logits are not copied into msgpack."""

    step_id: int
    rank: int
    shape: list[int]
    dtype: str  # "float32", or "bfloat16" / "float16" when the logits were computed in that dtype (lossless)
    data: bytes | memoryview  # C order; empty in the header frame

    @classmethod
    def frames(cls, step_id: int, rank: int, logits: torch.Tensor,
               wire_dtype: torch.dtype = torch.float32) -> list:
        """[msgpack header, raw bytes] (the bytes without a copy). ``wire_dtype``: the model's 16-bit dtype
        when every value is exact in it (half the bytes)."""
        t = logits.detach().to(wire_dtype).contiguous().cpu()
        header = cls(step_id, rank, list(t.shape), str(wire_dtype).removeprefix("torch."), b"")
        return [encode(header), t.view(torch.uint8).numpy()]

    def attach(self, data: bytes | memoryview) -> LogitsMsg:
        expected = math.prod(self.shape) * self._dtype().itemsize
        if self.data or len(data) != expected:
            raise MessageError(f"LogitsMsg: {len(data)} data bytes for shape {self.shape} {self.dtype}")
        self.data = data
        return self

    def _dtype(self) -> torch.dtype:
        dtype = DTYPES.get(self.dtype)  # the serving dtypes, by the names the engine config uses
        if dtype is None:
            raise MessageError(f"LogitsMsg: unknown dtype {self.dtype!r}")
        return dtype

    def tensor(self) -> torch.Tensor:
        """The logits in their wire dtype (the engine moves them to its device, then widens them)."""
        dtype = self._dtype()
        if not len(self.data):
            return torch.empty(self.shape, dtype=dtype)
        with warnings.catch_warnings():  # a received frame is read-only; the engine copies it at once
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(self.data, dtype=torch.uint8)
        return raw.view(dtype).reshape(self.shape)


@dataclass
class ReadyMsg:
    rank: int
    loaded_bytes: int
    num_layers: int


@dataclass
class ErrorMsg:
    rank: int
    message: str


@dataclass
class ShutdownMsg:
    reason: str = ""


@dataclass
class StatsRequestMsg:
    reset: bool  # start a new measuring window after answering


@dataclass
class StatsMsg:
    rank: int
    steps: int  # step plans run in the window
    busy_s: float  # time spent computing them (not waiting for the previous stage)
    span_s: float  # from the start of the window's first step to the end of its last


@dataclass
class ExpertLoadRequestMsg:
    seq: int  # the coordinator's window number, echoed back


@dataclass
class ExpertLoadMsg:
    """One rank's cumulative expert-load counters (``experts/load_counter.py``) as raw little-endian int64:
    ``logical`` [len(layer_ids), 2, num_logical], ``physical`` [len(layer_ids), 2, num_physical]."""

    rank: int
    seq: int
    layer_ids: list[int]
    num_logical: int
    num_physical: int
    logical: bytes
    physical: bytes

    @classmethod
    def of(cls, rank: int, seq: int, layer_ids: list[int], logical: torch.Tensor,
           physical: torch.Tensor) -> ExpertLoadMsg:
        return cls(rank, seq, list(layer_ids), int(logical.shape[-1]), int(physical.shape[-1]),
                   logical.to(torch.int64).contiguous().numpy().tobytes(),
                   physical.to(torch.int64).contiguous().numpy().tobytes())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logical, physical) int64 tensors; MessageError when the bytes do not match the shapes."""
        layers = len(self.layer_ids)
        out = []
        for data, width in ((self.logical, self.num_logical), (self.physical, self.num_physical)):
            if not isinstance(data, bytes) or width < 0 or len(data) != layers * 2 * width * 8:
                raise MessageError(f"ExpertLoadMsg: {len(data)} bytes for [{layers}, 2, {width}] int64")
            if not data:
                out.append(torch.zeros(layers, 2, width, dtype=torch.int64))
                continue
            out.append(torch.frombuffer(bytearray(data), dtype=torch.int64).reshape(layers, 2, width))
        return out[0], out[1]


@dataclass
class PlacementMsg:
    """A chunk of one MoE layer's new expert placement (``phy2log`` [ep][slots], that layer's after the
    chunk), in order with the step plans: every rank of the layer's stage copies the changed slots' weights
    from the ranks holding them (point to point) and routes with it from the next step on."""

    seq: int
    layer_id: int
    phy2log: list[list[int]]


@dataclass
class PlacementReadyMsg:
    rank: int
    seq: int
    error: str = ""  # why this rank could not take the chunk (the coordinator stops rebalancing that layer)
    seconds: float = 0.0  # how long the chunk held this rank up
    nbytes: int = 0  # expert weight bytes this rank received


@dataclass
class PreflightMsg:
    """Rank 0's timing of one all-reduce and one all-to-all over the whole world, before loading weights."""

    rank: int
    world_size: int
    nbytes: int
    all_reduce_s: float
    all_to_all_s: float


@dataclass
class KvSaveMsg:
    """Copy computed blocks to host-pool slots (-1: none) and, where ``to_store``, to the shared store
    (kvstore/mover.py). ``hashes``: each block's chain hash, 32 hex digits."""

    blocks: list[int]
    host_slots: list[int]
    hashes: list[str]
    tokens: list[list[int]]
    to_store: list[bool]


@dataclass
class KvLoadMsg:
    """Fill fresh device blocks from host-pool slots, then from the store, or from a prefill instance
    (``remote_*``: its transfer address, the transfer id it holds the blocks under, the index of the first
    block asked for, their chain hashes, this model's fingerprint, and the device blocks they go to); every
    rank answers KvLoadedMsg once done. Load id 0 asks only for the rank's counters."""

    load_id: int
    host_slots: list[int]
    host_blocks: list[int]
    store_hashes: list[str]
    store_tokens: list[list[int]]
    store_blocks: list[int]
    remote_addr: str = ""
    remote_id: str = ""
    remote_first: int = 0
    remote_hashes: list[str] = dataclasses.field(default_factory=list)
    remote_fingerprint: str = ""
    remote_blocks: list[int] = dataclasses.field(default_factory=list)
    remote_timeout_s: float = 10.0
    remote_backend: str = "zmq"  # how the bytes come: in the answer's frames (zmq) or by a NIXL read (nixl)
    # layer-wise (kvstore/layer_ready.py): steps that list this load wait, per layer, only for that layer
    layerwise: bool = False


@dataclass
class KvLoadedMsg:
    """A rank's answer to KvLoadMsg, with its cumulative store counters."""

    load_id: int
    rank: int
    num_store_loaded: int  # stored (or remote) blocks loaded, from the first
    bytes_read: int
    num_corrupt: int
    writes_dropped: int
    blocks_written: int
    bytes_written: int
    store_errors: int
    load_s: float = 0.0  # how long this rank took to load
    error: str = ""  # why the remote blocks did not come (refused, timed out, ...)


@dataclass
class KvServerMsg:
    """A prefill instance's rank serves its stage's layers of held blocks here (kvstore/transfer_server.py);
    sent once, before ReadyMsg, by tp rank 0 of each stage."""

    rank: int
    address: str
    layer_start: int
    num_layers: int


MESSAGE_TYPES: dict[str, type] = {cls.__name__: cls for cls in (KvServerMsg, StepPlanMsg, DraftPlanMsg, LogitsMsg, ReadyMsg, ErrorMsg,
                                                                ShutdownMsg, StatsRequestMsg, StatsMsg,
                                                                PreflightMsg, KvSaveMsg, KvLoadMsg,
                                                                KvLoadedMsg,
                                                                ExpertLoadRequestMsg,
                                                                ExpertLoadMsg, PlacementMsg, PlacementReadyMsg)}


def encode(msg: Any) -> bytes:
    body = dataclasses.asdict(msg)
    body["type"] = type(msg).__name__
    return msgpack.packb(body, use_bin_type=True)


def decode(frame: bytes) -> Any:
    try:
        body = msgpack.unpackb(frame, raw=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise MessageError(f"malformed msgpack frame: {e}") from e
    if not isinstance(body, dict) or body.get("type") not in MESSAGE_TYPES:
        raise MessageError("frame is not a typed message")
    cls = MESSAGE_TYPES[body.pop("type")]
    names = {f.name for f in dataclasses.fields(cls)}
    if set(body) != names:
        raise MessageError(f"{cls.__name__}: expected fields {sorted(names)}, got {sorted(body)}")
    return cls(**body)
