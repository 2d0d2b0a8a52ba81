"""Expert placement: which logical experts each EP rank holds, contiguous or from a placement file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeserve.comm.topology import InfeasiblePlanError


def expert_placement(num_experts: int, ep: int, placement_file: Path | None = None) -> list[list[int]]:
    """Per EP rank, the logical expert ids it holds in physical-slot order: [ep][slots_per_rank].

    Default: contiguous ranges (rank r holds ``r*E/ep .. (r+1)*E/ep - 1``). A placement file is JSON::

        {"phy2log": [[0, 1, 2, 7], [3, 4, 5, 6], ...]}   # one list per EP rank: the logical expert
                                                          # held in each of its physical slots
    Every rank has the same number of slots; a logical expert may sit on several ranks (a redundant copy
    of a hot expert) but at most once per rank; every logical expert sits somewhere. The same placement is
    used for every MoE layer. ``ExpertPlacement.from_ranks(placement, rank)`` gives one rank's share.
    """
    if placement_file is None:
        if num_experts % ep:
            raise InfeasiblePlanError(f"n_routed_experts ({num_experts}) is not divisible by ep ({ep}); "
                                      "give a placement file to place them unevenly")
        per_rank = num_experts // ep
        return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(ep)]
    try:
        raw = json.loads(Path(placement_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"placement file {placement_file}: {e}") from e
    phy2log = raw.get("phy2log") if isinstance(raw, dict) else None
    try:
        check_placement(phy2log, num_experts, ep)
    except ValueError as e:
        raise ValueError(f"placement file {placement_file}: {e}") from None
    return [list(row) for row in phy2log]  # type: ignore[union-attr]


def check_placement(phy2log: Any, num_experts: int, ep: int) -> None:
    """Raise ValueError unless ``phy2log`` is a valid [ep][slots] list of logical expert ids."""
    if not isinstance(phy2log, list) or not all(isinstance(row, list) for row in phy2log):
        raise ValueError('expected {"phy2log": [[ids of rank 0], [ids of rank 1], ...]}')
    if len(phy2log) != ep:
        raise ValueError(f"phy2log has {len(phy2log)} rank(s), ep is {ep}")
    sizes = {len(row) for row in phy2log}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every rank needs the same, non-zero number of slots, got {sorted(sizes)}")
    for rank, row in enumerate(phy2log):
        bad = [e for e in row if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"rank {rank}: expert ids must be integers in 0..{num_experts - 1}, got {bad[:5]}")
        if len(set(row)) != len(row):
            raise ValueError(f"rank {rank} holds an expert twice: {row}")
    missing = sorted(set(range(num_experts)) - {e for row in phy2log for e in row})
    if missing:
        raise ValueError(f"logical experts placed on no rank: {compact_ranges(missing)}")


def compact_ranges(ids: list[int] | tuple[int, ...]) -> str:
    """[0, 1, 2, 7, 3, 4] -> '0-2,7,3-4' (runs in the given order)."""
    runs: list[list[int]] = []
    for e in ids:
        if runs and e == runs[-1][1] + 1:
            runs[-1][1] = e
        else:
            runs.append([e, e])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"


