"""Reasoning, tool calls and structured output through a real ``moeserve serve`` subprocess, driven by the
official ``openai`` client (and the token RPC). The models' outputs are what they are, so the grammar forces
them: a JSON schema with nested objects, enums and arrays validates (``jsonschema``) on many seeds; forced
tool calls parse and validate; a tiny R1-style checkpoint (R1's tokens and chat template) gets its reasoning,
answer and native tool calls into their fields, streaming and not."""

from __future__ import annotations

import json
import subprocess

import jsonschema
import openai
import pytest
from r1_checkpoint import R1_CHAT_TEMPLATE, write_r1_checkpoint

from moeserve.client import Client
from moeserve.frontend.testing import serve_subprocess
from moeserve.model.tokenizer import Tokenizer

MODEL = "moeserve-default"
USER = [{"role": "user", "content": "Give me the record."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "role": {"enum": ["admin", "user", "guest"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "role", "age", "address", "tags"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]


def _serve(*args: str):
    return serve_subprocess("--kv-cache-memory", str(16 << 20), *args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout_s=300)


@pytest.fixture(scope="module")
def client():
    proc, url, _ = _serve("--tool-call-parser", "deepseek_v3")
    try:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    finally:
        proc.kill()
        proc.wait()


def test_json_schema_validates_on_many_seeds(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=USER, response_format=fmt, n=8, seed=11,
                                       temperature=1.0, max_tokens=120)
    assert len(r.choices) == 8
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = client.chat.completions.create(model=MODEL, messages=USER, response_format=fmt, seed=5, max_tokens=120,
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"}, n=8,
                                       seed=3, max_tokens=80)
    assert all(c.message.content.startswith("{") for c in r.choices)
    done = [c for c in r.choices if c.finish_reason == "stop"]  # the others ran out of tokens mid-object
    assert done and all(isinstance(json.loads(c.message.content), dict) for c in done)


def test_named_tool_call_arguments_validate(client) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice, n=4, seed=2,
                                       max_tokens=60)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    stream = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice, seed=3,
                                            max_tokens=60, stream=True)
    deltas = [d for chunk in stream if chunk.choices for d in chunk.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), WEATHER)


def test_required_tool_call_and_tool_choice_none(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, n=4, seed=7, max_tokens=80)
    schemas = {"get_weather": WEATHER, "get_time": TIME}
    for c in r.choices:
        (call,) = c.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none", max_tokens=12,
                                       seed=1)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=12, seed=1)  # auto
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content  # the model wrote no call


def test_bad_schemas_and_tool_choices_are_400(client) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "no-such-type"}}}}}
    with pytest.raises(openai.BadRequestError, match="no-such-type"):
        client.chat.completions.create(model=MODEL, messages=USER, response_format=bad, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=30, seed=1,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no")


# ---- a tiny DeepSeek-R1-style checkpoint ----
THINK = "[a-z ]{2,16}"
FORCED_CALL = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n"
               "\\{\"zone\": \"(utc|cet)\"\\}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    ckpt = write_r1_checkpoint(tmp_path_factory.mktemp("r1"))
    proc, url, rpc = _serve("--model", str(ckpt), "--reasoning-parser", "deepseek_r1",
                            "--tool-call-parser", "deepseek_v3", "--served-model-name", "r1")
    try:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300), rpc, ckpt
    finally:
        proc.kill()
        proc.wait()


def test_r1_reasoning_and_content_land_in_their_fields(r1) -> None:
    client, rpc, _ = r1
    forced = {"structured_outputs": {"regex": f"{THINK}</think>\n\n[a-z]{{2,12}}"}}
    r = client.chat.completions.create(model="r1", messages=USER, max_tokens=60, seed=4, extra_body=forced)
    msg = r.choices[0].message
    reasoning, answer = msg.reasoning_content, msg.content  # type: ignore[attr-defined]
    assert reasoning and answer.startswith("\n\n") and answer.strip().isalpha(), msg
    assert "<think>" not in reasoning + answer and "</think>" not in reasoning + answer
    details = r.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < r.usage.completion_tokens
    stream = client.chat.completions.create(model="r1", messages=USER, max_tokens=60, seed=4, extra_body=forced,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == answer
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == details.reasoning_tokens
    with Client(rpc, timeout_s=120) as c:  # the token RPC's "reasoning" return field: the same split
        frames = list(c.generate(token_ids=_r1_prompt(r1[2]), return_fields=["reasoning"],
                                 max_tokens=60, seed=4, temperature=1.0,
                                 structured_output=json.dumps({"type": "regex",
                                                               "pattern": f"{THINK}</think>\n\n[a-z]{{2,12}}"})))
    assert "".join(f.get("reasoning_delta", "") for f in frames) == reasoning
    assert "".join(f.get("content_delta", "") for f in frames) == answer
    assert frames[-1]["usage"]["reasoning_tokens"] == details.reasoning_tokens
    with Client(rpc, timeout_s=120) as c:  # not streamed: the final frame carries the whole split
        done = c.complete(token_ids=_r1_prompt(r1[2]), stream=False, return_fields=["reasoning"], max_tokens=60,
                          seed=4, temperature=1.0, structured_output=json.dumps(
                              {"type": "regex", "pattern": f"{THINK}</think>\n\n[a-z]{{2,12}}"}))
    assert (done.reasoning, done.content) == (reasoning, answer)


def _r1_prompt(ckpt) -> list[int]:
    """The chat request's prompt tokens: R1's template rendered by transformers, encoded without another BOS."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), bos_token="<|bos|>")
    text = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True, chat_template=R1_CHAT_TEMPLATE)
    assert text.endswith("<｜Assistant｜><think>\n")
    return Tokenizer.from_dir(ckpt).encode(text, add_bos=False)


def test_r1_native_tool_calls_and_tool_messages(r1) -> None:
    client, _, ckpt = r1
    forced = {"structured_outputs": {"regex": f"{THINK}</think>\n\n{FORCED_CALL}"}}
    r = client.chat.completions.create(model="r1", messages=USER, tools=TOOLS, max_tokens=80, seed=8,
                                       extra_body=forced)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.reasoning_content, c  # type: ignore[attr-defined]
    (call,) = c.message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("utc", "cet")
    assert not (c.message.content or "").strip()
    stream = client.chat.completions.create(model="r1", messages=USER, tools=TOOLS, max_tokens=80, seed=8,
                                            extra_body=forced, stream=True)
    deltas = [d for ch in stream if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_time", call.function.arguments)]
    # the next turn: the assistant's call and the tool's result, rendered as R1's template writes them
    turn = [*USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    r = client.chat.completions.create(model="r1", messages=turn, tools=TOOLS, max_tokens=4, seed=1)
    want = (f"<|bos|><｜User｜>{USER[0]['content']}<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
            f"<｜tool▁sep｜>get_time\n```json\n{call.function.arguments}\n```<｜tool▁call▁end｜>"
            "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>12:00<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    assert r.usage.prompt_tokens == len(Tokenizer.from_dir(ckpt).encode(want, add_bos=False))
