"""OpenAI request bodies (validated: unknown fields and wrong types are 400s, as OpenAI answers) and the
response / stream-chunk shapes of /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from moeserve.coordinator.sampling import SamplingParams
from moeserve.frontend.errors import BadFrame, BadRequest, FrameTooLarge
from moeserve.frontend.openai_tools import (
    MessageToolCall,
    ResponseFormat,
    StructuredOutputs,
    Tool,
    ToolChoice,
)
from moeserve.frontend.protocol import validation_message
from moeserve.frontend.service import sampling_params
from moeserve.kvstore.disagg import KvTransferError, KvTransferParams

TokenId = Annotated[int, Field(ge=0, lt=2**31)]
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1)  # choices; over the server's --max-n is a limit_exceeded 400
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    # structured output (openai_tools.py)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # prefill/decode disaggregation (vLLM's name; kvstore/disagg.py): set by `moeserve router`
    kv_transfer_params: dict[str, Any] | None = None

    def sampling(self, default_max_tokens: int, max_tokens: int | None, top_logprobs: int | None,
                 index: int, names: dict[str, str]) -> SamplingParams:
        """Choice ``index``'s SamplingParams; ``names``: this request's field for a SamplingParams field
        of another name (an invalid value is a 400 naming the field the client sent)."""
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported", "logit_bias")
        fields: dict[str, Any] = {"max_tokens": default_max_tokens if max_tokens is None else max_tokens}
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids", "stop"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        if self.seed is not None:  # choice i of n draws with seed + i, so choices differ but reproduce
            fields["seed"] = (self.seed + index) % 2**64
        fields["logprobs"] = top_logprobs
        if self.kv_transfer_params is not None:
            try:
                fields["kv_transfer"] = KvTransferParams.from_dict(self.kv_transfer_params).to_json()
            except KvTransferError as e:
                raise BadRequest(str(e), "kv_transfer_params") from None
        return sampling_params(fields, names)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(prompt_problem(value)) from None

    def prompts(self) -> list[str | list[int]]:
        if self.echo:
            raise BadRequest("echo is not supported", "echo")
        if self.suffix:
            raise BadRequest("suffix is not supported", "suffix")
        if self.best_of not in (None, 1, self.n):
            raise BadRequest("best_of must equal n", "best_of")
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise BadRequest("prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def params(self, index: int, default_max_tokens: int = 16) -> SamplingParams:
        return self.sampling(default_max_tokens, self.max_tokens, self.logprobs, index, {})


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    reasoning_content: str | None = None  # accepted and not shown to the template (as vLLM)

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:  # content stays None: templates (R1's) test it to write the calls
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
            out["content"] = content
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more variables for the chat template

    def params(self, index: int, default_max_tokens: int) -> SamplingParams:
        top = (self.top_logprobs or 0) if self.logprobs else None
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        names = {"logprobs": "top_logprobs"}
        max_tokens = self.max_tokens
        if self.max_completion_tokens is not None:
            max_tokens, names["max_tokens"] = self.max_completion_tokens, "max_completion_tokens"
        return self.sampling(default_max_tokens, max_tokens, top, index, names)


def prompt_problem(value: Any) -> str:
    """Why ``value`` is no prompt, in one sentence (the union's own errors name its four branches)."""
    allowed = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    rows = value if isinstance(value, list) and value and all(isinstance(r, list) for r in value) else [value]
    for row in rows:
        if isinstance(row, list) and row and all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            bad = next((t for t in row if not 0 <= t < 2**31), None)
            if bad is not None:
                return f"{bad} is not a token id: token ids are integers in [0, vocabulary size)"
    return f"must be {allowed}, got {_json_kind(value)}"


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an empty list" if not value else "a list holding " + ", ".join(sorted({_json_kind(v) for v in value}))
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object"}
    return names.get(type(value), "null")


def find_lone_surrogate(body: Any) -> tuple[str, str] | None:
    """(field, escaped character) of the first lone UTF-16 surrogate in a decoded JSON value (JSON may spell
    one as ``"\\ud800"``; it is not Unicode text: no tokenizer, log or response can carry it); keys count."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        items: list[tuple[str, Any]] = []
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                return where, f"U+{ord(found.group()):04X}"
        elif isinstance(value, dict):
            for key, item in value.items():
                name = f"{where}.{key}" if where else key
                found = _SURROGATE.search(key)
                if found:
                    return name, f"U+{ord(found.group()):04X}"
                items.append((name, item))
        elif isinstance(value, list):
            items = [(f"{where}.{i}", item) for i, item in enumerate(value)]
        stack.extend(reversed(items))
    return None


def _escaped(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, model: type[_Body], max_bytes: int) -> Any:
    """Bytes of an HTTP body -> a validated request; BadFrame / FrameTooLarge / BadRequest otherwise."""
    if len(raw) > max_bytes:
        raise FrameTooLarge(f"request body of {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise BadFrame("the request body is not valid UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise BadFrame(f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadFrame("the request body must be a JSON object")
    surrogate = find_lone_surrogate(body)
    if surrogate is not None:
        where, char = surrogate
        raise BadRequest(f"field {_escaped(where)!r}: a lone surrogate ({char}) is not Unicode text; send valid "
                         "UTF-16 pairs or the character itself", _escaped(where))
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = validation_message(e, body)
        raise BadRequest(message, param) from None


def error_body(code: str, message: str, kind: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
