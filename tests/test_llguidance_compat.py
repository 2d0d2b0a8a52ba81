"""Structured output with the llguidance API that pyproject's bound admits: before 1.7, ``LLTokenizer`` takes
one EOS id (an int) and raises TypeError for a list; 1.6.1 is the newest wheel where glibc is older than 2.31.
The installed llguidance is wrapped to refuse a list as 1.6 does, and a real server (in this process) must
still answer a ``response_format`` request with valid JSON that ends at EOS."""

from __future__ import annotations

import json

import httpx
import llguidance
import pytest

from moeserve.coordinator.config import EngineConfig
from moeserve.frontend.server_config import ServerConfig
from moeserve.frontend.testing import BackgroundServer

SCHEMA = {"type": "object", "properties": {"role": {"enum": ["admin", "user"]}}, "required": ["role"],
          "additionalProperties": False}


def one_eos_tokenizer(real):
    """``real`` with the constructor of llguidance < 1.7 (``eos_token: Optional[int]``)."""
    calls: list[object] = []

    def make(tokenizer, n_vocab=None, eos_token=None, slices=None):
        calls.append(eos_token)
        if isinstance(eos_token, list):  # what the 1.6 binding raises
            raise TypeError("argument 'eos_token': 'list' object cannot be interpreted as an integer")
        return real(tokenizer, n_vocab=n_vocab, eos_token=eos_token, slices=slices)

    make.calls = calls  # type: ignore[attr-defined]
    return make


def test_response_format_with_the_one_eos_api(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = one_eos_tokenizer(llguidance.LLTokenizer)
    monkeypatch.setattr(llguidance, "LLTokenizer", fake)
    config = ServerConfig(engine=EngineConfig(kv_cache_memory=8 << 20), port=0, rpc_port=0)
    with BackgroundServer(config) as s:
        fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}
        body = {"model": "moeserve-default", "messages": [{"role": "user", "content": "hi"}], "n": 4,
                "seed": 1, "max_tokens": 40, "response_format": fmt}
        r = httpx.post(s.http_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop", choice  # the grammar's end let EOS through
        assert json.loads(choice["message"]["content"])["role"] in ("admin", "user")
    assert fake.calls[0] == [1] and fake.calls[-1] == 1  # the list was refused, then the one id was given
