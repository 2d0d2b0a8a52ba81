"""The NIXL backend of instance-to-instance KV transfer (``--kv-transfer-backend nixl``): the latent bytes go
by a one-sided NIXL READ from the prefill instance's registered cache tensors into the decode instance's
(UCX: shared memory or TCP between CPUs; CUDA IPC, RDMA, RoCE between GPUs), not through the control socket.

Over the ZeroMQ control channel (kvstore/remote.py) only descriptors travel: the prefill instance answers a
pull with its NIXL agent's metadata (NIXL's own bytes, handed to ``add_remote_agent``; never unpickled here)
and one ``[address, length, device]`` triple per layer and block, in msgpack; the decode instance reads them
into its own blocks and sends ``release``, which lets the prefill instance's hold go.

The ``nixl`` package is imported only when this backend is asked for (the ``nixl`` extra: ``nixl-cu12``).
"""

from __future__ import annotations

import importlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch


class NixlUnavailable(RuntimeError):
    """The nixl package cannot be imported here."""


def _nixl_api() -> Any:
    for name in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise NixlUnavailable("--kv-transfer-backend nixl needs the nixl package (pip install nixl-cu12, or nixl)")


def _mem_type(t: torch.Tensor) -> str:
    return "DRAM" if t.device.type == "cpu" else "VRAM"


class NixlAgent:
    """This process's NIXL agent with the cache tensors of its rank registered."""

    def __init__(self, caches: Sequence[torch.Tensor], role: str):
        api = _nixl_api()
        self.agent = api.nixl_agent(f"moeserve-{role}-{uuid.uuid4().hex[:12]}",
                                    api.nixl_agent_config(backends=["UCX"]))
        self.caches = list(caches)
        self._registered = self.agent.register_memory(self.caches)
        self._remotes: dict[bytes, str] = {}  # metadata -> agent name

    @property
    def metadata(self) -> bytes:
        return bytes(self.agent.get_agent_metadata())

    def descriptors(self, blocks: Sequence[int], caches: Sequence[torch.Tensor] | None = None) -> list[list[int]]:
        """[address, length, device] of each layer's row of each block, layer-major (``caches``: those layers
        of the registered ones; default all)."""
        out = []
        for cache in self.caches if caches is None else caches:
            row = cache[0].numel() * cache.element_size()
            dev = cache.device.index or 0
            out += [[cache[b].data_ptr(), row, dev] for b in blocks]
        return out

    def read(self, remote_metadata: bytes, remote: list[list[int]], blocks: Sequence[int], timeout_s: float,
             caches: Sequence[torch.Tensor] | None = None) -> str:
        """READ ``remote`` (descriptors, as ``descriptors`` gives them) into this rank's ``blocks`` of
        ``caches`` (default all layers): "" when done, else why not."""
        local = self.descriptors(blocks, caches)
        if len(local) != len(remote) or any(lr[1] != rr[1] for lr, rr in zip(local, remote)):
            return "the remote blocks do not match this cache's layout"
        name = self._remotes.get(remote_metadata)
        if name is None:
            name = self._remotes[remote_metadata] = self.agent.add_remote_agent(remote_metadata)
        kind = _mem_type(self.caches[0])
        handle = self.agent.initialize_xfer("READ", self.agent.get_xfer_descs([tuple(d) for d in local], kind),
                                            self.agent.get_xfer_descs([tuple(d) for d in remote], kind), name)
        state = "ERR"
        try:
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + timeout_s
            while state == "PROC" and time.monotonic() < deadline:
                time.sleep(0.0002)
                state = self.agent.check_xfer_state(handle)
        finally:
            # NOTE: releasing a read still in progress aborts it: nothing writes into the blocks once the
            # load is reported (they may be freed and reused)
            self.agent.release_xfer_handle(handle)
        if state == "DONE":
            return ""
        return "NIXL read timed out" if state == "PROC" else "NIXL read failed"

    def close(self) -> None:
        self.agent.deregister_memory(self._registered)
