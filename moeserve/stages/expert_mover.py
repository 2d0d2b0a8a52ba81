"""Online expert re-placement on one rank: stage the new placement's weights in the background, swap at a
step boundary.

``begin`` takes a new placement (``PlacementMsg``). ``work`` then stages a few MoE layers at a time -- after
each step, or while the rank is idle: for every slot whose logical expert changes, the weights come from
another slot of this rank that holds the expert already, or else from the checkpoint (or the dummy
generator, for dummy weights), through the same ``WeightSpec``s loading uses. Nothing the model serves
with changes until ``swap``, which the coordinator orders at one step boundary for every rank: the staged
rows are written into the expert tensors and each MoE layer takes the new placement (routing tables,
copy holders, the counter's physical slots).

NOTE: staging holds only the changed slots (``[moved, 2I, H]`` per layer); the swap is an in-place copy of
those rows.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from moeserve.experts.moe import ExpertPlacement, MoE
from moeserve.model.dummy import DummyReader
from moeserve.model.loader import Checkpoint, _Reader, fill_weights
from moeserve.model.weights import _expert_specs

if TYPE_CHECKING:
    from moeserve.stages.runner import ModelRunner


@dataclass
class StagedLayer:
    slots: torch.Tensor  # [moved] local slots whose expert changes
    tensors: dict[str, torch.Tensor]  # w13 / w2 (/ scales): [moved, ...] the new rows


def apply_placement(moe: MoE, placement: ExpertPlacement) -> None:
    """Make ``moe`` route with ``placement`` (its weights must already match the new slots): its
    ``ExpertMap`` is written in place, so captured CUDA graphs read the new tables."""
    moe.expert_map.update(placement)
    moe.slots_changed()


class ExpertMover:
    def __init__(self, runner: ModelRunner, model_path: str, load_format: str, seed: int, ep_rank: int):
        self.runner = runner
        self.model_path, self.load_format, self.seed = model_path, load_format, seed
        self.ep_rank = ep_rank
        self.seq = 0
        self.phy2log: list[list[int]] | None = None
        self.todo: list[int] = []  # MoE layers still to stage
        self.staged: dict[int, StagedLayer] = {}
        self.layers_per_step = 1

    @property
    def active(self) -> bool:
        return bool(self.todo)

    def begin(self, seq: int, phy2log: list[list[int]], layers_per_step: int) -> None:
        moe_layers = self.runner.model.moe_layers()
        current = next(iter(moe_layers.values())).placement if moe_layers else None
        if current is not None and len(phy2log[self.ep_rank]) != current.num_local:
            raise ValueError(f"the new placement has {len(phy2log[self.ep_rank])} slots per rank, this rank "
                             f"{current.num_local}: the number of slots cannot change while serving")
        self.seq, self.phy2log, self.layers_per_step = seq, phy2log, max(1, layers_per_step)
        self.todo, self.staged = list(moe_layers), {}

    def work(self, num_layers: int | None = None) -> bool:
        """Stage up to ``num_layers`` (default ``layers_per_step``) layers; True once every layer is staged."""
        moe_layers = self.runner.model.moe_layers()
        with ExitStack() as stack:
            reader = None
            for _ in range(num_layers or self.layers_per_step):
                if not self.todo:
                    break
                layer_id = self.todo.pop(0)
                if reader is None:
                    reader = self._reader(stack, moe_layers[layer_id])
                self.staged[layer_id] = self._stage(layer_id, moe_layers[layer_id], reader)
        return not self.todo

    def _reader(self, stack: ExitStack, moe: MoE) -> Any:
        config = self.runner.model.config
        if self.load_format == "dummy":
            return _DummyByName(config.quant_block_size, moe.w13.device, self.seed)
        return _Reader(Checkpoint(self.model_path), stack, config.quant_block_size)

    def _stage(self, layer_id: int, moe: MoE, reader: Any) -> StagedLayer:
        assert self.phy2log is not None
        old, new = list(moe.placement.local_logical_ids), self.phy2log[self.ep_rank]
        moved = [s for s in range(len(new)) if new[s] != old[s]]
        names = [n for n in ("w13", "w2", "w13_scale_inv", "w2_scale_inv") if getattr(moe, n) is not None]
        rows = {n: torch.empty((len(moved), *getattr(moe, n).shape[1:]), dtype=getattr(moe, n).dtype,
                               device=getattr(moe, n).device) for n in names}
        target = SimpleNamespace(**({"shard": moe.shard, "expert_tp": moe.expert_tp, "w13_scale_inv": None,
                                     "w2_scale_inv": None} | rows))
        with torch.no_grad():
            for i, slot in enumerate(moved):
                expert = new[slot]
                if expert in old:  # held here already, in another slot: a local copy
                    for n in names:
                        rows[n][i].copy_(getattr(moe, n)[old.index(expert)])
                    continue
                specs = _expert_specs(f"model.layers.{layer_id}.mlp", target, i, expert)  # type: ignore[arg-type]
                if isinstance(reader, _DummyByName):
                    reader.shapes.update({spec.name: spec.shape for spec in specs})
                fill_weights(specs, reader)
        return StagedLayer(torch.tensor(moved, dtype=torch.long), rows)

    def swap(self, seq: int) -> None:
        """Serve with the staged placement from now on."""
        if seq != self.seq or self.todo or self.phy2log is None:
            raise RuntimeError(f"placement {seq} is not staged on rank {self.ep_rank}")
        moe_layers = self.runner.model.moe_layers()
        counter = self.runner.expert_load
        with torch.no_grad():
            for layer_id, staged in self.staged.items():
                moe = moe_layers[layer_id]
                for name, rows in staged.tensors.items():
                    getattr(moe, name)[staged.slots.to(rows.device)] = rows
                apply_placement(moe, ExpertPlacement.from_ranks(self.phy2log, self.ep_rank, moe.placement.num_logical))
                if counter is not None:
                    counter.placement_changed(layer_id)
        self.staged, self.phy2log = {}, None


class _DummyByName(DummyReader):
    """The dummy generator, told each tensor's full shape as the specs are made."""

    def __init__(self, block: tuple[int, int] | None, device: torch.device, seed: int):
        super().__init__({}, block, device, seed)
