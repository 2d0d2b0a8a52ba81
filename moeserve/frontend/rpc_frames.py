"""What the RPC server's frames carry besides the tokens (docs/protocol.md): a request's ``usage`` counts,
the fields a token frame adds for its ``return`` list (logprobs, expert trace), and those of the final frame
(a non-streaming request's text and per-token fields, token ids, timings)."""

from __future__ import annotations

from typing import Any

from moeserve.frontend.protocol import Generate
from moeserve.frontend.service import FinalEvent, TokenEvent


def usage_counts(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_extra(ev: TokenEvent, fields: set[str]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if "logprobs" in fields:
        extra["logprobs"] = ev.logprobs
        if ev.top_logprobs is not None:  # [[token id, logprob], ...] per token: map keys stay strings
            extra["top_logprobs"] = [[[t, lp] for t, lp in row.items()] for row in ev.top_logprobs]
    if "expert_trace" in fields and ev.expert_ids is not None:
        extra["expert_ids"] = ev.expert_ids
    return extra


def final_extra(ev: FinalEvent, msg: Generate, prompt_ids: list[int], collected: list[TokenEvent]
                 ) -> dict[str, Any]:
    fields = set[str](msg.return_fields)
    extra: dict[str, Any] = {}
    if not msg.stream:
        extra["text"] = ev.text
        extra["output_token_ids"] = ev.token_ids
        per_token = [token_extra(t, fields) for t in collected]
        for name in ("logprobs", "top_logprobs", "expert_ids"):
            if any(name in p for p in per_token):
                extra[name] = [x for p in per_token for x in p.get(name, [])]
    if "token_ids" in fields:
        extra["prompt_token_ids"] = prompt_ids
        extra["output_token_ids"] = ev.token_ids
    if "timings" in fields:
        extra["timings"] = ev.timings.as_dict()
    return extra
