"""Checkpoint loading: shards, FP8 block scales, clear errors, only-what-is-asked-for, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve.experts.moe import ExpertPlacement
from moeserve.model.deepseek import DeepseekModel, ModelSlice
from moeserve.model.loader import Checkpoint, CheckpointError, dequantize_fp8, load_model
from moeserve.model.synthetic import quantize_fp8, write_random_checkpoint
from moeserve.model.weights import weight_specs

SMALL = {
    "model_type": "deepseek_v3", "vocab_size": 300, "hidden_size": 256, "intermediate_size": 384,
    "moe_intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "n_shared_experts": 1,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "kv_lora_rank": 64,
    "q_lora_rank": 96, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32,
    "first_k_dense_replace": 1, "max_position_embeddings": 256, "routed_scaling_factor": 2.5,
}


def _params(model: DeepseekModel) -> dict[str, torch.Tensor]:
    return {s.name: s.target for s in weight_specs(model)}


def test_sharded_equals_single(tmp_path: Path) -> None:
    single = write_random_checkpoint(SMALL, tmp_path / "one", seed=3)
    sharded = write_random_checkpoint(SMALL, tmp_path / "many", seed=3, max_shard_bytes=400_000)
    assert len(set(Checkpoint(sharded).weight_map.values())) > 2
    a, b = _params(load_model(single)), _params(load_model(sharded))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fp8_block_scales_dequantized_on_load(tmp_path: Path) -> None:
    path = write_random_checkpoint(SMALL, tmp_path / "fp8", seed=1, fp8=True)
    raw = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert raw[name].dtype == torch.float8_e4m3fn
    assert raw[name + "_scale_inv"].shape == (2, 1)  # [256, 128] in 128x128 blocks
    expected = raw[name].float() * raw[name + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(path, dtype=dtype)
        got = _params(model)[name]
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.to(dtype).float(), rtol=0, atol=0)


def test_fp8_partial_blocks() -> None:
    w = torch.randn(200, 130)
    q, s = quantize_fp8(w)
    assert s.shape == (2, 2)
    back = dequantize_fp8(q, s, (128, 128), torch.float32)
    assert back.shape == w.shape
    assert (back - w).abs().max() < 0.07 * w.abs().max()
    with pytest.raises(CheckpointError, match="weight_scale_inv has shape"):
        dequantize_fp8(q, s[:1], (128, 128), torch.float32)


def test_missing_and_misshaped_tensor_named(tmp_path: Path) -> None:
    path = write_random_checkpoint(SMALL, tmp_path / "c", seed=0)
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.self_attn\.kv_b_proj\.weight "
                                              r"\(expected shape \[256, 64\]\)"):
        load_model(path)
    state["model.layers.2.self_attn.kv_b_proj.weight"] = torch.zeros(256, 65)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight has shape \[256, 65\], expected \[256, 64\]"):
        load_model(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a directory"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        Checkpoint(tmp_path)


def test_slice_loads_only_its_layers_and_experts(tmp_path: Path) -> None:
    path = write_random_checkpoint(SMALL, tmp_path / "c", seed=2)
    full = _params(load_model(path))
    placement = ExpertPlacement.contiguous(8, ep_rank=1, ep_size=2)
    part = load_model(path, model_slice=ModelSlice(1, 3, 3, placement))
    names = _params(part)
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" in names
    assert not any(n.startswith("model.layers.0.") for n in names)
    assert any(".experts.4." in n for n in names) and not any(".experts.3." in n for n in names)
    for name, tensor in names.items():
        assert torch.equal(tensor, full[name]), name


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, gc
    import torch

    def status(key):  # per-process figures from /proc (VmHWM is the peak resident size since exec)
        text = open("/proc/self/status").read()
        return int(text.split(key + ":")[1].split()[0]) * 1024

    from moeserve.model.deepseek import ModelSlice
    from moeserve.model.loader import load_model
    path, start, end, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    gc.collect()
    before = status("VmRSS")
    model = load_model(path, model_slice=ModelSlice(start, end, n))
    peak = status("VmHWM")
    kept = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"before": before, "peak": peak, "kept": kept}))
""")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = dict(SMALL, hidden_size=1024, moe_intermediate_size=512, n_routed_experts=16, num_hidden_layers=6,
                  intermediate_size=2048, vocab_size=4096, kv_lora_rank=256, q_lora_rank=384)
    return write_random_checkpoint(config, tmp_path_factory.mktemp("big") / "ckpt", max_shard_bytes=64 << 20)


@pytest.mark.parametrize("layers", [(0, 6), (2, 4)])
def test_peak_memory_near_kept_size(big_checkpoint: Path, layers: tuple[int, int]) -> None:
    total = Checkpoint(big_checkpoint).total_bytes()
    assert total >= 200e6
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(big_checkpoint), str(layers[0]),
                          str(layers[1]), "6"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["before"]
    # the kept weights plus the rope tables and one transient tensor at a time; never the whole checkpoint
    assert growth <= 1.05 * r["kept"] + 48e6, r
    if layers == (2, 4):
        assert r["kept"] < 0.45 * total and growth < 0.6 * total, r
