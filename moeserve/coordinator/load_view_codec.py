"""A ``LoadView`` as a msgpack-able map and back: how a replica process (``frontend/replica.py``) sends its
expert load to the front end, which serves /metrics, /v1/expert_load and the dashboard for every replica."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from moeserve.coordinator.expert_load import LoadView, Rebalance

TENSORS = ("total", "window", "physical_total", "physical_window", "phy2log", "rank_base")


def _tensor(t: torch.Tensor | None) -> list | None:
    return None if t is None else [list(t.shape), t.to(torch.int64).contiguous().numpy().tobytes()]


def _untensor(body: list | None, dtype: torch.dtype = torch.int64) -> torch.Tensor | None:
    if body is None:
        return None
    shape, data = body
    numel = 1
    for n in shape:
        numel *= n
    if len(data) != numel * 8:
        raise ValueError(f"{len(data)} bytes for an int64 tensor of shape {shape}")
    flat = torch.frombuffer(bytearray(data), dtype=torch.int64) if numel else torch.zeros(0, dtype=torch.int64)
    return flat.reshape(shape).to(dtype)


def encode_view(view: LoadView) -> dict[str, Any]:
    body = {f.name: getattr(view, f.name) for f in dataclasses.fields(view) if f.name not in TENSORS}
    body.update({name: _tensor(getattr(view, name)) for name in TENSORS})
    body["layer_ids"] = list(view.layer_ids)
    body["rank_ids"] = [list(r) for r in view.rank_ids]
    body["history"] = [list(h) for h in view.history]
    body["rebalances"] = [dataclasses.astuple(r) for r in view.rebalances]
    return body


def decode_view(body: dict[str, Any]) -> LoadView:
    tensors = {name: _untensor(body[name]) for name in TENSORS}
    rest = {f.name: body[f.name] for f in dataclasses.fields(LoadView) if f.name not in TENSORS and f.name in body}
    rest["layer_ids"] = tuple(rest["layer_ids"])
    rest["rank_ids"] = tuple(tuple(r) for r in rest["rank_ids"])
    rest["history"] = tuple(tuple(h) for h in rest.get("history", ()))
    rest["rebalances"] = tuple(Rebalance(*r) for r in rest.get("rebalances", ()))
    return LoadView(**rest, **tensors)  # type: ignore[arg-type]


class ViewReporter:
    """A replica process's side: its engine's latest view, once per new view, as the message body the front
    end decodes (``decode_view``); and a rebalance asked for over the wire."""

    def __init__(self, engine: Any):
        self.monitor = engine.expert_load
        self.sent: LoadView | None = None

    def poll(self, idle: bool) -> dict[str, Any] | None:
        """The view to send now, if it is new (``idle``: the engine has no work; close a window left open)."""
        if idle:
            self.monitor.idle()
        view = self.monitor.view
        if view is None or view is self.sent:
            return None
        self.sent = view
        return {"type": "expert_load", "view": encode_view(view)}

    def request_rebalance(self) -> None:
        if self.monitor.rebalancer is not None:
            self.monitor.rebalancer.request()
