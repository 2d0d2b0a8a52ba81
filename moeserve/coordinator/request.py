"""A request's state inside the coordinator."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from moeserve.coordinator.sampling import SamplingParams


class RequestError(ValueError):
    """A request that can never be served (too long, bad parameters); raised at once by add_request."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose latents are in the cache
    num_preemptions: int = 0
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    detokenizer: Any = None
    grammar: Any = None  # structured output: the request's llguidance matcher (coordinator/structured.py)
    grammar_after: str | None = None  # the matcher starts once the output text holds this
    output_text: str = ""  # detokenized output so far (after stop-string truncation when finished)
    num_text_emitted: int = 0  # characters of output_text already streamed
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    # tokens sampled for this request in batches whose outputs have not been processed yet (vLLM's name):
    # with async scheduling the next batch is scheduled before the last one's ids reach the host
    num_output_placeholders: int = 0
    # speculative decoding (coordinator/spec_decode.py): the draft tokens the next step verifies, their draft
    # distributions ([k, vocab] on the device; None when drafted greedily), and what was drafted / accepted
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: torch.Tensor | None = None
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """The tokens this request holds once the batches in flight are processed: what the scheduler plans
        for."""
        return len(self.token_ids) + self.num_output_placeholders

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this request can ever hold in the cache."""
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int, logprob: float, now: float) -> None:
        self.token_ids.append(token_id)
        self.output_logprobs.append(logprob)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
