"""The request side of tools, ``tool_choice``, ``response_format`` and ``structured_outputs`` (vLLM's
extension: ``json`` / ``regex`` / ``choice`` / ``grammar``), and what one chat request makes of them: the
grammar spec the engine enforces (coordinator/structured.py) and how its output is parsed (chat_output.py).

With a reasoning parser and a prompt that opened ``<think>``, the forced tool call and
``response_format`` constrain the answer only (the grammar starts after ``</think>``); ``structured_outputs``
constrains the whole output.

``tool_choice``: ``none`` (tools are shown to the template, the output is text), ``auto`` (the model may
call them; needs ``--tool-call-parser``), ``required`` (the output is forced to a JSON array of
``{"name", "parameters"}`` calls), or a named function (the output is forced to its parameters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moeserve.coordinator.structured import StructuredOutputError, compile_spec, spec_json
from moeserve.frontend.errors import BadRequest
from moeserve.frontend.reasoning import THINK_END


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class _Name(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: _Name


class CalledFunction(_Body):
    name: str
    arguments: str


class MessageToolCall(_Body):
    """A tool call in an assistant message sent back by the client."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs`` extension: exactly one of its fields."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # a Lark grammar (llguidance's dialect)


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def _format_spec(fmt: ResponseFormat | None, so: StructuredOutputs | None) -> dict[str, Any] | None:
    if fmt is not None and so is not None and fmt.type != "text":
        raise BadRequest("give response_format or structured_outputs, not both", "response_format")
    if fmt is not None and fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise BadRequest("response_format json_schema needs json_schema.schema", "response_format")
        return {"type": "json_schema", "schema": fmt.json_schema.schema_}
    if so is None:
        return None
    given = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                               ("grammar", so.grammar)) if v is not None}
    if len(given) != 1:
        raise BadRequest("structured_outputs needs exactly one of json, regex, choice, grammar",
                         "structured_outputs")
    kind, value = next(iter(given.items()))
    if kind == "json":
        try:
            schema = json.loads(value) if isinstance(value, str) else value
        except ValueError as e:
            raise BadRequest(f"structured_outputs.json is not valid JSON: {e}", "structured_outputs") from None
        if not isinstance(schema, dict):
            raise BadRequest("structured_outputs.json must be a JSON schema object", "structured_outputs")
        return {"type": "json_schema", "schema": schema}
    key = {"regex": "pattern", "choice": "choices", "grammar": "grammar"}[kind]
    return {"type": {"grammar": "lark"}.get(kind, kind), key: value}


def _tools_spec(tools: list[Tool], choice: ToolChoice | None, parallel: bool | None) -> dict[str, Any] | None:
    def params(t: Tool) -> dict[str, Any]:
        return t.function.parameters or {"type": "object"}

    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise BadRequest(f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")
        return {"type": "json_schema", "schema": params(named[0])}
    if choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": params(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if parallel is False:
        schema["maxItems"] = 1
    return {"type": "json_schema", "schema": schema}


@dataclass(frozen=True)
class ChatSetup:
    """What one request asks of the output: the grammar spec (JSON text or None) and how to parse it."""

    structured_output: str | None = None
    reasoning: bool = False  # split R1 reasoning out of the text
    opened: bool = False  # the prompt left <think> open
    tool_mode: str = "none"  # none | deepseek_v3 (parse the model's calls) | named | required
    tool_name: str = ""  # the named function


def checked_spec(spec: dict[str, Any] | None, param: str) -> str | None:
    """The spec's text, compiled once here so that a bad schema is a 400 with the library's reason."""
    if spec is None:
        return None
    text = spec_json(spec)
    try:
        compile_spec(text)
    except StructuredOutputError as e:
        raise BadRequest(f"{param}: {e}", param) from None
    return text


def chat_setup(body: Any, reasoning_parser: str | None, tool_parser: str | None, opened: bool,
               chat: bool = True) -> ChatSetup:
    """Validate the request's tool and format fields against the server's parsers; raises BadRequest."""
    tools: list[Tool] = (getattr(body, "tools", None) or []) if chat else []
    choice = getattr(body, "tool_choice", None) if chat else None
    if choice is not None and choice != "none" and not tools:
        raise BadRequest("tool_choice needs tools", "tool_choice")
    effective: ToolChoice = choice or ("auto" if tools else "none")
    if effective == "auto" and tool_parser is None:
        raise BadRequest("tool_choice 'auto' needs a server started with --tool-call-parser deepseek_v3 "
                         "(or use tool_choice 'required', a named function, or 'none')", "tool_choice")
    tool_spec = _tools_spec(tools, effective, getattr(body, "parallel_tool_calls", None))
    fmt_spec = _format_spec(body.response_format, body.structured_outputs)
    if tool_spec is not None and fmt_spec is not None:
        raise BadRequest("a forced tool call (tool_choice required or named) cannot take a response_format",
                         "response_format")
    spec = tool_spec or fmt_spec
    reasoning = chat and reasoning_parser is not None
    answer_only = tool_spec is not None or (body.response_format is not None and body.response_format.type != "text")
    if spec is not None and reasoning and opened and answer_only:
        # R1 reasons freely first; the grammar starts after </think>. structured_outputs (vLLM's low-level
        # extension) constrains the whole output instead, reasoning included.
        spec = {**spec, "after": THINK_END}
    mode = "named" if isinstance(effective, NamedToolChoice) else (
        effective if effective == "required" else ("deepseek_v3" if effective == "auto" else "none"))
    return ChatSetup(checked_spec(spec, "tool_choice" if tool_spec else "response_format"), reasoning, opened,
                     mode, effective.function.name if isinstance(effective, NamedToolChoice) else "")
