"""Copies between the host and a device that never wait for the device's stream.

On CUDA, ``tensor.to("cuda")`` from ordinary (pageable) host memory, and ``.tolist()`` / ``.cpu()`` of a
device tensor, each synchronize the stream: the host waits until every kernel queued so far has run. The
engine queues step N+1 while the device still runs step N (async scheduling), so the hot path uses these
two helpers instead: host-to-device through pinned memory (``to_device``) and device-to-host into pinned
memory with an event (``HostCopy``). On the CPU both are plain (and free) copies.

The lowest layer of the package, beside ``dtypes.py``: it imports only torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, without waiting for the device's queued work on CUDA (a
    tensor already on a device is moved the ordinary way).

    NOTE: the pinned copy comes from PyTorch's caching host allocator, which keeps the block until the
    asynchronous copy out of it has run, so the caller may drop ``host`` at once."""
    if device.type == "cuda" and host.device.type == "cpu":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class HostCopy:
    """Device tensors copied to the host, started now and waited for later (``wait``).

    On CUDA the copies go into pinned buffers and an event is recorded after them; ``wait`` blocks only
    until that event, i.e. until the kernels queued before the copies have run, not for later ones."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.event: torch.cuda.Event | None = None
        if tensors and tensors[0].device.type == "cuda":
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                         for t in tensors]
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = [t.to("cpu", copy=True) for t in tensors]  # a copy on the CPU too: the source may change

    def ready(self) -> bool:
        """Whether ``wait`` would return at once."""
        return self.event is None or self.event.query()

    def wait(self) -> list[torch.Tensor]:
        """The host tensors, once their copies have run."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host
