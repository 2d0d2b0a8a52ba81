"""Pure parts of the front end: the RPC decoder (a hypothesis test: any bytes or any msgpack value become a
typed message or a typed error), the bounds, API keys, the replica router and the chat template."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeserve.coordinator.sampling import SamplingParams
from moeserve.frontend.auth import ApiKeys, key_id
from moeserve.frontend.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from moeserve.frontend.errors import BadFrame, BadRequest, Busy, FrameTooLarge, LimitExceeded, Unauthorized
from moeserve.frontend.limits import Admission, ServerLimits, check_request
from moeserve.frontend.protocol import Generate, Ping, decode_client_message
from moeserve.frontend.router import PrefixIndex, choose_replica
from moeserve.kvstore.prefix import block_hashes

FUZZ = settings(derandomize=True, deadline=None, max_examples=400,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["generate", "abort", "resume", "ping", "other"])},
    optional={"request_id": values | st.text(min_size=1, max_size=10), "prompt": values | st.text(),
              "token_ids": values | st.lists(st.integers(-5, 2**40)), "params": values, "v": values,
              "stream": values, "return": values, "last_seq": values, "api_key": values, "nonce": values,
              "extra": values})


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_fail_typed(frame: bytes) -> None:
    try:
        decode_client_message(frame, 1 << 16)
    except BadRequest:
        pass


@FUZZ
@given(messages)
def test_any_message_decodes_or_fails_typed(body: dict) -> None:
    try:
        msg = decode_client_message(msgpack.packb(body, use_bin_type=True), 1 << 16)
    except BadRequest as e:
        assert e.message
    else:
        assert msg.type == body["type"]


def test_decoder_examples() -> None:
    ok = decode_client_message(msgpack.packb({"type": "generate", "request_id": "a", "prompt": "hi",
                                              "return": ["timings"]}), 1024)
    assert isinstance(ok, Generate) and ok.return_fields == ["timings"] and ok.stream
    assert isinstance(decode_client_message(msgpack.packb({"type": "ping"}), 1024), Ping)
    with pytest.raises(FrameTooLarge):
        decode_client_message(b"\x00" * 2000, 1024)
    with pytest.raises(BadFrame, match="UTF-8"):
        decode_client_message(b"\x81\xa4type\xa2\xc3\x28", 1024)
    with pytest.raises(BadRequest, match="exactly one"):
        decode_client_message(msgpack.packb({"type": "generate", "request_id": "a"}), 1024)
    with pytest.raises(BadRequest, match="unknown field 'x'") as e:
        decode_client_message(msgpack.packb({"type": "ping", "x": 1}), 1024)
    with pytest.raises(BadRequest) as e:
        decode_client_message(msgpack.packb({"type": "abort", "request_id": "r1", "v": 2}), 1024)
    assert e.value.request_id == "r1"


def test_limits_and_admission() -> None:
    lim = ServerLimits(max_queued_requests=2, max_tokens_in_flight=100, max_prompt_tokens=10, max_tokens=20)
    check_request(lim, 10, SamplingParams(max_tokens=20), 1, 512)
    for args, param in [((11, SamplingParams(), 1), "prompt"), ((5, SamplingParams(max_tokens=21), 1), "max_tokens"),
                        ((5, SamplingParams(), 9), "n"), ((5, SamplingParams(stop=["x" * 300]), 1), "stop")]:
        with pytest.raises(LimitExceeded) as e:
            check_request(lim, *args, max_model_len=512)
        assert e.value.param == param
    adm = Admission(lim)
    a, b = adm.admit(1, 40), adm.admit(1, 40)
    with pytest.raises(Busy, match="queued"):
        adm.admit(1, 10)
    a.started()
    with pytest.raises(Busy, match="tokens in flight"):
        adm.admit(1, 30)
    a.release(), a.release(), b.release()
    assert (adm.num_queued, adm.num_in_flight, adm.tokens_in_flight) == (0, 0, 0)


def test_api_keys() -> None:
    keys = ApiKeys(["alpha", "beta"])
    assert keys.check("beta") == key_id("beta") and keys.check_bearer("Bearer alpha") == key_id("alpha")
    for bad in (None, "", "alph", "alpha ", "gamma"):
        with pytest.raises(Unauthorized):
            keys.check(bad)
    with pytest.raises(Unauthorized):
        keys.check_bearer("Basic alpha")
    assert ApiKeys([]).check(None) is None


def test_router_prefers_the_cached_prefix_unless_unbalanced() -> None:
    ix = PrefixIndex(capacity=3)
    ix.insert([1, 2, 3, 4])
    assert len(ix) == 3 and ix.match([2, 3, 4]) == 3 and ix.match([1, 2]) == 0
    assert choose_replica([0, 5, 2], [10, 50, 0]) == 1
    assert choose_replica([0, 0, 0], [10, 50, 3]) == 2
    assert choose_replica([0, 5, 0], [10, 9000, 10]) == 0  # out of balance: least loaded
    assert choose_replica([0, 5], [1, 1], policy="round_robin", counter=3) == 1
    a, b = block_hashes(list(range(40)), 16), block_hashes(list(range(32)) + [7] * 8, 16)
    assert len(a) == 2 and a == b and block_hashes(list(range(1, 33)), 16)[0] != a[0]


def test_chat_template_default_when_missing() -> None:
    t = ChatTemplate(None)
    assert t.is_default and DEFAULT_CHAT_TEMPLATE
    assert t.render([{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"


def test_chat_template_kwargs_add_variables_only() -> None:
    t = ChatTemplate(None)
    t.template = t.template.environment.from_string("{{ bos_token }}{{ 'T' if thinking }}{{ n + 1 if n }}")
    assert t.render([], extra={"thinking": True}) == "T" and t.render([]) == ""
    for key in ("messages", "bos_token", "namespace", "raise_exception"):
        with pytest.raises(BadRequest) as e:
            t.render([], extra={key: 1})
        assert e.value.param == f"chat_template_kwargs.{key}"
    with pytest.raises(BadRequest) as e:  # template code on a client's value: the request's 400, not a 500
        t.render([], extra={"n": "one"})
    assert e.value.param == "chat_template_kwargs" and "TypeError" in e.value.message
