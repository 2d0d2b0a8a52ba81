"""On a CUDA device: the start-up check keeps the fast path (fused kernels and CUDA graphs) on for the shapes the
engine serves -- DeepSeek-V2-Lite (bf16) and DeepSeek-V3 at full width with FP8 experts, each cut in depth to
one dense layer and two MoE layers (dummy weights), and the embedded default model (its own weights) -- and
each engine then decodes with graphs. Every kernel kind present in the model is checked against its eager
reference, and the check's verdict is read from its log.

The check judges each kind on the model's own inputs; the whole model's difference from the eager ops is only
logged (routing near-ties compound through the layers), so a pass here is the per-kind verdict (issue 20).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "configs"


def _cut(name: str, dest: Path, num_layers: int, num_dense: int) -> str:
    """The benchmark config ``name`` with ``num_layers`` layers, the first ``num_dense`` dense."""
    config = json.loads((CONFIGS / name / "config.json").read_text())
    config.update(num_hidden_layers=num_layers, first_k_dense_replace=num_dense, num_nextn_predict_layers=0)
    dest.mkdir()
    (dest / "config.json").write_text(json.dumps(config))
    return str(dest)


@pytest.mark.parametrize("shape", ["deepseek_v2_lite", "deepseek_v3_fp8", "embedded"])
def test_the_start_up_check_keeps_the_fast_path_on(tmp_path, caplog, shape):
    from moeserve.coordinator.config import EngineConfig, default_model_path
    from moeserve.coordinator.engine import Engine
    from moeserve.coordinator.sampling import SamplingParams
    from moeserve.stages.op_checks import present_kinds

    if shape == "deepseek_v2_lite":
        config = dict(model=_cut("deepseek_v2_lite", tmp_path / "m", 3, 1), load_format="dummy")
    elif shape == "deepseek_v3_fp8":  # FP8 experts with 128 x 128 block scales, as the config says
        config = dict(model=_cut("deepseek_v3_6l", tmp_path / "m", 3, 1), load_format="dummy")
    else:
        config = dict(model=str(default_model_path()))
    caplog.set_level(logging.INFO, logger="moeserve.stages.selfcheck")
    engine = Engine(EngineConfig(device="cuda", skip_tokenizer_init=True, max_num_seqs=4, max_model_len=512,
                                 kv_cache_memory=1 << 30, **config))
    try:
        runner = engine.executor.runner
        checked = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fast path check: the ")]
        kinds = sorted(present_kinds(runner.model))
        assert {"mla", "moe", "router", "rmsnorm", "rope"} <= set(kinds)
        for kind in kinds:
            lines = [m for m in checked if f"the {kind} kernel " in m]
            assert lines and all(m.endswith(": ok") for m in lines), (kind, lines)
        assert runner.fast_path_error is None, runner.fast_path_error
        assert runner.graphs is not None  # CUDA graphs captured
        gen = torch.Generator().manual_seed(0)
        vocab = engine.model_config.vocab_size
        for i, n in enumerate((40, 300)):  # a short prompt and one of several blocks, then decode steps in graphs
            ids = torch.randint(2, vocab, (n,), generator=gen).tolist()
            engine.add_request(f"r{i}", prompt_token_ids=ids,
                               params=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        done: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.output_token_ids or []
        assert sorted(done) == ["r0", "r1"]
        assert all(len(t) == 8 and all(0 <= x < vocab for x in t) for t in done.values())
    finally:
        engine.close()
