"""SpeculativeConfig: ``--speculative-config`` (vLLM's flag and JSON), parsed and validated once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from moeserve.errors import UserError

METHODS = ("mtp",)  # DeepSeek-V3/R1's multi-token-prediction module as the drafter
MAX_SPECULATIVE_TOKENS = 8


class SpeculativeConfigError(UserError, ValueError):
    """A --speculative-config that cannot be used; the message names the field."""


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "mtp"
    num_speculative_tokens: int = 1  # drafts per step; past the first, the one MTP module is chained
    # turning speculation down (coordinator/spec_policy.py): a step with drafts must emit tokens at least as
    # fast as one without, measured per batch-size bucket; every ``probe_interval`` steps the other mode is
    # measured again
    probe_interval: int = 32
    adaptive: bool = True  # false: every step drafts, whatever it measures (tests, measurements)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpeculativeConfigError(f"--speculative-config: method {self.method!r} is not supported "
                                         f"(supported: {', '.join(METHODS)})")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise SpeculativeConfigError(f"--speculative-config: num_speculative_tokens must be an integer in "
                                         f"1..{MAX_SPECULATIVE_TOKENS}, got {k!r}")
        if not isinstance(self.adaptive, bool):
            raise SpeculativeConfigError(f"--speculative-config: adaptive must be true or false, got {self.adaptive!r}")
        if isinstance(self.probe_interval, bool) or not isinstance(self.probe_interval, int) \
                or self.probe_interval < 2:
            raise SpeculativeConfigError(f"--speculative-config: probe_interval must be an integer >= 2, "
                                         f"got {self.probe_interval!r}")

    @property
    def num_lookahead_tokens(self) -> int:
        """Cache slots past a step's tokens that chained drafts write (the first draft needs none)."""
        return self.num_speculative_tokens - 1

    @classmethod
    def parse(cls, text: str | dict[str, Any] | None) -> SpeculativeConfig | None:
        """From the flag's JSON text (or a dict); None for an empty one."""
        if text is None or text == "" or text == {}:
            return None
        raw = text
        if isinstance(text, str):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise SpeculativeConfigError(f"--speculative-config: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise SpeculativeConfigError(f"--speculative-config must be a JSON object, got {text!r}")
        known = {"method", "num_speculative_tokens", "probe_interval", "adaptive"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SpeculativeConfigError(f"--speculative-config: unknown field(s) {', '.join(unknown)} "
                                         f"(known: {', '.join(sorted(known))})")
        if "method" not in raw:
            raise SpeculativeConfigError('--speculative-config needs "method" (supported: mtp)')
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "num_speculative_tokens": self.num_speculative_tokens,
                           "probe_interval": self.probe_interval, "adaptive": self.adaptive})
