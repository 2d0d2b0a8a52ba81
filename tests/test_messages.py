"""The typed msgpack messages between the coordinator and stage workers: round trips, and bad frames refused."""

from __future__ import annotations

import msgpack
import pytest
import torch

from moeserve.comm.messages import LogitsMsg, MessageError, StatsMsg, StepPlanMsg, decode, encode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_round_trip_is_exact(dtype: torch.dtype) -> None:
    logits = torch.randn(3, 50).to(dtype).float()  # values exact in the wire dtype, as the LM head makes them
    header, data = LogitsMsg.frames(7, 1, logits, dtype)
    msg = decode(header).attach(memoryview(data.tobytes()))
    assert isinstance(msg, LogitsMsg) and msg.step_id == 7 and msg.dtype == str(dtype).removeprefix("torch.")
    assert len(msg.data) == logits.numel() * torch.empty((), dtype=dtype).element_size()
    with pytest.raises(MessageError, match="data bytes"):
        decode(header).attach(b"\x00" * 3)  # a frame that does not match the header
    assert msg.tensor().dtype == dtype and torch.equal(msg.tensor().float(), logits)


def test_plan_and_stats_round_trip() -> None:
    plan = StepPlanMsg(3, [5, 6, 7], [2, 1], [0, 4], [[0], [1, 2]], [0, 1], [], [9])
    assert decode(encode(plan)) == plan
    stats = StatsMsg(2, 10, 0.5, 1.25)
    assert decode(encode(stats)) == stats


def test_bad_frames_are_refused() -> None:
    with pytest.raises(MessageError, match="malformed"):
        decode(b"\xc1")
    with pytest.raises(MessageError, match="not a typed message"):
        decode(msgpack.packb({"type": "Pickle", "x": 1}))
    with pytest.raises(MessageError, match="expected fields"):
        decode(msgpack.packb({"type": "StatsMsg", "rank": 1}))
    bad = LogitsMsg(1, 0, [1, 2], "int8", b"")
    with pytest.raises(MessageError, match="unknown dtype"):
        decode(encode(bad)).attach(b"\x00\x00")
