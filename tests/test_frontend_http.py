"""The OpenAI-compatible HTTP API against a real uvicorn server (in-process, free port, the embedded model),
driven by the official ``openai`` client and by raw httpx: streaming and not, chat, logprobs, seed, stop, n,
auth, limits, malformed bodies, busy / draining, health, metrics, the audit log, and a disconnect that
returns the block pool to its starting count."""

from __future__ import annotations

import dataclasses
import json
import time

import httpx
import jinja2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moeserve.coordinator.config import EngineConfig, default_model_path
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams
from moeserve.frontend.limits import ServerLimits
from moeserve.frontend.server_config import ServerConfig
from moeserve.frontend.testing import BackgroundServer
from moeserve.model.tokenizer import Tokenizer

KEY = "sekret-key"
MODEL = "moeserve-default"
ENGINE = EngineConfig(kv_cache_memory=16 << 20, max_num_seqs=64)
PROMPT = "def fib(n):"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(ENGINE)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    cfg = ServerConfig(engine=ENGINE, port=0, rpc_port=0, api_key=KEY, audit_log=str(audit),
                       limits=ServerLimits(max_tokens=256, max_n=4, max_frame_bytes=64 << 10))
    with BackgroundServer(cfg) as s:
        s.audit_path = audit  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def alone(engine: Engine, ids: list[int], n: int) -> list[int]:
    return engine.generate([ids], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].output_token_ids


def post(server, path: str, body, key: str | None = KEY, headers: dict | None = None, **kw) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.http_url + path, content=data, headers=headers, timeout=60, **kw)


def test_completions_with_the_openai_client(client, engine) -> None:
    ids = alone(engine, engine.tokenizer.encode(PROMPT), 20)
    want = engine.tokenizer.decode(ids)
    extra = {"ignore_eos": True}
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, extra_body=extra)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == len(engine.tokenizer.encode(PROMPT))
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 20
    r = client.completions.create(model=MODEL, prompt=[0, 5, 9], max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and all(len(t) == 2 for t in lp.top_logprobs)


def test_chat_with_the_openai_client(client, engine) -> None:
    messages = [{"role": "system", "content": "python"}, {"role": "user", "content": "import os"}]
    text = engine.tokenizer.chat_template and "<|bos|>python\nimport os\n"
    ids = alone(engine, engine.tokenizer.encode(text, add_bos=False), 12)
    want = engine.tokenizer.decode(ids)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True}, logprobs=True, top_logprobs=3)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert len(r.choices[0].logprobs.content) == 12 and len(r.choices[0].logprobs.content[0].top_logprobs) == 3
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True}, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seed_n_and_stop(client) -> None:
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7, n=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    assert a.usage.completion_tokens == sum(16 for _ in a.choices) or a.choices[0].finish_reason == "stop"
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = full[6:9]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:full.index(stop)]
    assert client.models.list().data[0].id == MODEL


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, "bad_frame"),
    (b"\xff\xfe{}", 400, "bad_frame"),
    (b'{"model": "moeserve-default", "prompt": "x", "max_tokens": NaN}', 400, "bad_frame"),
    (b"[1, 2]", 400, "bad_frame"),
    ({"model": MODEL}, 400, "bad_request"),
    ({"model": MODEL, "prompt": "x", "bogus": 1}, 400, "bad_request"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "bad_request"),
    ({"model": MODEL, "prompt": "x", "temperature": -3}, 400, "bad_request"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 100000}, 400, "limit_exceeded"),
    ({"model": MODEL, "prompt": "x", "n": 50}, 400, "limit_exceeded"),
    ({"model": MODEL, "prompt": [10**7]}, 400, "bad_request"),
    ({"model": MODEL, "prompt": "x " * 3000}, 400, "limit_exceeded"),
    ({"model": MODEL, "prompt": "x" * (70 << 10)}, 400, "frame_too_large"),
    ({"model": "other", "prompt": "x"}, 404, "not_found"),
])
def test_bad_requests_get_typed_errors(server, body, status, code) -> None:
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]


USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("path,fields,param,message", [
    ("/v1/completions", {"max_tokens": -1}, "max_tokens",
     "field 'max_tokens': must be an integer >= 1, got -1"),
    ("/v1/completions", {"temperature": -1}, "temperature", "field 'temperature': must be >= 0 (0 = greedy), "
                                                            "got -1.0"),
    ("/v1/completions", {"logprobs": 21}, "logprobs", "field 'logprobs': must be in [0, 20], got 21"),
    ("/v1/completions", {"top_p": 0}, "top_p", "field 'top_p': must be in (0, 1], got 0.0"),
    ("/v1/chat/completions", {"max_tokens": -1}, "max_tokens", "field 'max_tokens': must be an integer >= 1, "
                                                               "got -1"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens",
     "field 'max_completion_tokens': must be an integer >= 1, got 0"),
    ("/v1/chat/completions", {"temperature": -1}, "temperature",
     "field 'temperature': must be >= 0 (0 = greedy), got -1.0"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs",
     "field 'top_logprobs': must be in [0, 20], got 50"),
    ("/v1/chat/completions", {"chat_template_kwargs": ["thinking"]}, "chat_template_kwargs",
     "field 'chat_template_kwargs': Input should be a valid dictionary"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages",
     "chat_template_kwargs may not set 'messages', which the server sets"),
    ("/v1/completions", {"n": 0}, "n", "field 'n': Input should be greater than or equal to 1"),
    ("/v1/chat/completions", {"n": 0}, "n", "field 'n': Input should be greater than or equal to 1"),
])
def test_400s_name_the_field_at_fault(server, path, fields, param, message) -> None:
    """As OpenAI answers: ``param`` is the request's field, the message says what it allows (not a 200 with
    no choices for n=0, not SamplingParams' internal names)."""
    base = {"model": MODEL, "messages": USER} if "chat" in path else {"model": MODEL, "prompt": "x"}
    r = post(server, path, {**base, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": message, "type": "invalid_request_error", "param": param,
                                 "code": "bad_request"}


def test_auth_health_metrics_and_audit(server, client) -> None:
    assert httpx.get(server.http_url + "/health").status_code == 200  # no key needed
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        assert httpx.get(server.http_url + path).status_code == 401
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "x"}, key="nope").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.http_url + "/v1", api_key="nope", max_retries=0).models.list()
    client.completions.create(model=MODEL, prompt="audit me", max_tokens=3)
    text = httpx.get(server.http_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("moeserve_requests_total", "moeserve_time_to_first_token_seconds_bucket",
                 "moeserve_inter_token_latency_seconds_bucket", "moeserve_requests_running",
                 "moeserve_requests_waiting", "moeserve_kv_blocks_used", "moeserve_prefix_cache_hit_tokens_total"):
        assert name in text
    assert 'outcome="bad_request"' in text and 'outcome="ok"' in text
    records = [json.loads(line) for line in server.audit_path.read_text().splitlines()]
    assert records and all({"time", "request_id", "key_id", "prompt_sha256", "prompt_tokens",
                            "completion_tokens"} <= set(r) for r in records)
    assert "audit me" not in server.audit_path.read_text()


def http_outcomes(server) -> dict[str, float]:
    """moeserve_requests_total{protocol="http"} by outcome, from a real /metrics scrape."""
    text = httpx.get(server.http_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {s.labels["outcome"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "moeserve_requests" for s in family.samples
            if s.name == "moeserve_requests_total" and s.labels["protocol"] == "http"}


def test_client_mistakes_are_not_server_errors(server) -> None:
    """A 404 (another model) or 415 (a form body) is the client's: outcome client_error, never the "error"
    that the MoeserveErrorRate alert reads (deploy/prometheus/alerts.yml)."""
    before = http_outcomes(server)
    assert post(server, "/v1/completions", {"model": "other", "prompt": "x"}).status_code == 404
    assert post(server, "/v1/chat/completions", b"model=x", headers={
        "Content-Type": "application/x-www-form-urlencoded"}).status_code == 415
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}).status_code == 400
    after = http_outcomes(server)
    assert after["client_error"] - before.get("client_error", 0) == 2
    assert after["bad_request"] - before.get("bad_request", 0) == 1
    assert after.get("error", 0) == before.get("error", 0) == 0


def test_disconnect_mid_stream_frees_the_blocks(server) -> None:
    engine = server.server._engines[0].engine
    start = engine.kv.num_free_blocks
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.http_url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.kv.num_free_blocks < start or engine.requests
    deadline = time.monotonic() + 10
    while (engine.requests or engine.kv.num_free_blocks != start) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.requests and engine.kv.num_free_blocks == start == engine.kv.num_blocks


def test_busy_then_draining() -> None:
    cfg = ServerConfig(engine=ENGINE, port=0, rpc_port=0, limits=ServerLimits(max_queued_requests=1,
                                                                              max_tokens_in_flight=600))
    with BackgroundServer(cfg) as s:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.http_url + "/v1/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()  # kept: closing the iterator would close the connection
            next(lines)
            r = httpx.post(s.http_url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 429 and r.json()["error"]["code"] == "busy" and r.headers["retry-after"]
        s.call(s.server.drain())
        assert httpx.get(s.http_url + "/health").status_code == 503
        r = httpx.post(s.http_url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


THINKING_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt and thinking %}<think>\n{% endif %}")


def test_chat_template_kwargs_reach_the_template(tmp_path) -> None:
    """vLLM's chat_template_kwargs, as R1/V3.1 apps send them: {"thinking": true} is a variable of the
    template (here one that opens <think> when it is set, as DeepSeek-V3.1's does)."""
    model = default_model_path()
    for f in model.iterdir():
        (tmp_path / f.name).symlink_to(f)
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tcfg, "chat_template": THINKING_TEMPLATE}))
    tok = Tokenizer.from_dir(tmp_path)
    bos = tok.decode([tok.bos_token_id], skip_special_tokens=False)
    want = {flag: len(tok.encode(jinja2.Template(THINKING_TEMPLATE).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True, bos_token=bos,
        thinking=flag),
        add_bos=False)) for flag in (True, False)}
    assert want[True] > want[False]
    cfg = ServerConfig(engine=dataclasses.replace(ENGINE, model=str(tmp_path)), port=0, rpc_port=0,
                       served_model_name=MODEL)
    with BackgroundServer(cfg) as s:
        client = openai.OpenAI(base_url=s.http_url + "/v1", api_key="none", max_retries=0, timeout=60)
        cases = (({"thinking": True}, True), ({"thinking": False}, False), ({}, False), (None, False))
        for kwargs, thinking in cases:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=1, extra_body={"chat_template_kwargs": kwargs})
            assert r.usage.prompt_tokens == want[thinking], kwargs
