"""Tests for moeserve.coordinator.sampling_params: validation with the field named, plain-dict parsing, and the
stop checks (check_stop)."""

from __future__ import annotations

import dataclasses

import pytest

from moeserve.coordinator.sampling import SamplingParams, SamplingParamsError, check_stop

# ----------------------------------------------------------------------------- params validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1),
        ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -2.1),
        ("max_tokens", 0), ("logprobs", 21), ("logprobs", -1), ("top_k", -2), ("min_tokens", 17),
        ("seed", -1), ("temperature", float("nan")), ("stop", ("",)), ("stop_token_ids", (-1,)),
    ],
)
def test_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_from_dict_accepts_plain_values() -> None:
    p = SamplingParams.from_dict({"temperature": 0, "stop": ["a", "b"], "stop_token_ids": [3], "seed": 7})
    assert p.stop == ("a", "b") and p.stop_token_ids == (3,) and p.greedy
    assert isinstance(p.temperature, float)
    assert SamplingParams.from_dict({"stop": "END"}).stop == ("END",)
    assert SamplingParams.from_dict(dataclasses.asdict(p)) == p
    assert hash(p) == hash(SamplingParams.from_dict(dataclasses.asdict(p)))


@pytest.mark.parametrize(
    "d, field",
    [
        ({"temperature": "1"}, "temperature"), ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"), ({"stop": [1]}, "stop"), ({"seed": "x"}, "seed"),
        ({"ignore_eos": 1}, "ignore_eos"), ({"top_p": None}, "top_p"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"logprobs": 2.0}, "logprobs"),
    ],
)
def test_from_dict_rejects_wrong_types(d: dict, field: str) -> None:
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams.from_dict(d)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(SamplingParamsError, match="best_of"):
        SamplingParams.from_dict({"temperature": 1.0, "best_of": 2})
    with pytest.raises(SamplingParamsError):
        SamplingParams.from_dict(["temperature"])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- check_stop


def test_check_stop_length_and_eos() -> None:
    p = SamplingParams(max_tokens=3)
    assert check_stop(p, [5, 6], "ab", (2,), 1) == (None, None)
    assert check_stop(p, [5, 6, 7], "abc", (2,), 1) == ("length", None)
    assert check_stop(p, [5, 2], "a", (2,), 0) == ("stop", None)
    assert check_stop(p, [5, 6, 2], "ab", (2,), 0) == ("stop", None)  # stop beats length
    assert check_stop(SamplingParams(ignore_eos=True), [5, 2], "a", (2,), 0) == (None, None)
    assert check_stop(SamplingParams(stop_token_ids=(9,)), [9], "", (2,), 0) == ("stop", None)


def test_check_stop_min_tokens() -> None:
    p = SamplingParams(min_tokens=3, stop=("x",))
    assert check_stop(p, [2], "", (2,), 0) == (None, None)
    assert check_stop(p, [4, 4], "ax", (2,), 1) == (None, None)
    assert check_stop(p, [4, 4, 2], "ax", (2,), 0) == ("stop", None)


def test_check_stop_string_across_deltas() -> None:
    p = SamplingParams(stop=("world", "!!"))
    assert check_stop(p, [1], "Hello wor", (), 9) == (None, None)
    finish, cut = check_stop(p, [1, 2], "Hello world and", (), 6)  # "ld and" completes "world"
    assert finish == "stop" and "Hello world and"[:cut] == "Hello "
    assert check_stop(p, [1, 2], "a!!b!", (), 1) == (None, None)  # "!!" lies wholly in old text
    assert check_stop(p, [1, 2], "a!!b!!", (), 1) == ("stop", 4)
    assert check_stop(p, [1, 2], "xx!!world", (), 9) == ("stop", 2)  # earliest stop string wins
    assert check_stop(p, [1, 2], "world", (), 0) == (None, None)
