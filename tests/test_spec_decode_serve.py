"""Speculative decoding through the real front ends: an HTTP server (in-process, free port) serving a tiny
checkpoint with an MTP module answers greedy requests with the text it gives without speculation, reports
accepted / rejected drafts in the request's usage and the spec-decode families on /metrics; the CLI refuses
the flag for a model without the module, in one line."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_cli_errors import DEFAULT, moeserve, one_line_error

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams
from moeserve.coordinator.spec_config import SpeculativeConfig
from moeserve.frontend.server_config import ServerConfig
from moeserve.frontend.testing import BackgroundServer

PROMPT = "def heapify(x):"


@pytest.fixture(scope="module")
def ckpt(ckpt_factory):
    return ckpt_factory("v3_noaux_norm", mtp=True)


def test_http_with_mtp(ckpt) -> None:
    engine = EngineConfig(model=str(ckpt), kv_cache_memory=4 << 20)
    plain = Engine(engine).generate([PROMPT], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    spec = SpeculativeConfig(num_speculative_tokens=2, adaptive=False)
    with BackgroundServer(ServerConfig(engine=EngineConfig(model=str(ckpt), kv_cache_memory=4 << 20,
                                                           speculative_config=spec), port=0, rpc_port=0,
                                          served_model_name="m")) as s:
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(s.http_url + "/v1/completions", json=body, timeout=60).json()
        assert "choices" in reply, reply
        assert reply["choices"][0]["text"] == plain.output_text
        usage = reply["usage"]
        details = usage["completion_tokens_details"]
        assert usage["completion_tokens"] == 24
        assert details["accepted_prediction_tokens"] >= 0 and details["rejected_prediction_tokens"] >= 0
        assert details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"] > 0
        text = httpx.get(s.http_url + "/metrics", timeout=30).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    drafts = values["moeserve_spec_decode_draft_tokens_total"]
    assert drafts == details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"]
    assert values["moeserve_spec_decode_accepted_tokens_total"] == details["accepted_prediction_tokens"]
    assert values["moeserve_spec_decode_verifications_total"] > 0
    assert values["moeserve_spec_decode_mean_acceptance_length"] >= 1.0


def test_cli_refuses_the_flag_without_a_module(tmp_path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for f in DEFAULT.iterdir():
        (model / f.name).symlink_to(f)
    (model / "config.json").unlink()
    import json

    config = json.loads((DEFAULT / "config.json").read_text())
    config.pop("num_nextn_predict_layers", None)
    (model / "config.json").write_text(json.dumps(config))
    proc = moeserve("generate", "--model", str(model), "--speculative-config",
                    '{"method": "mtp", "num_speculative_tokens": 1}', "hello")
    one_line_error(proc, "generate", "num_nextn_predict_layers")
    proc = moeserve("generate", "--speculative-config", '{"method": "eagle"}', "hello")
    one_line_error(proc, "generate", "method 'eagle' is not supported")
