"""Dummy weights from config.json alone, and FP8 routed experts kept in float8 (dequantized per layer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeserve.comm.shard import ShardInfo
from moeserve.coordinator.config import EngineConfig
from moeserve.experts.moe import ExpertPlacement, MoE
from moeserve.launch import cli
from moeserve.model.attn_metadata import build_attn_metadata
from moeserve.model.deepseek import DeepseekModel, ModelSlice
from moeserve.model.dummy import DummyReader
from moeserve.model.fp8 import dequantize_into
from moeserve.model.loader import CheckpointError, load_model
from moeserve.model.synthetic import quantize_fp8, write_random_checkpoint
from moeserve.model.weights import weight_specs

SMALL = {
    "model_type": "deepseek_v3", "vocab_size": 300, "hidden_size": 256, "intermediate_size": 384,
    "moe_intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4, "n_shared_experts": 1,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "kv_lora_rank": 64,
    "q_lora_rank": 96, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32,
    "first_k_dense_replace": 1, "max_position_embeddings": 256, "routed_scaling_factor": 2.5,
}
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
# partial 128-blocks everywhere in the experts: [2 x 80, 192] and [192, 80]
PARTIAL = dict(SMALL, hidden_size=192, moe_intermediate_size=80)


def config_dir(tmp_path: Path, raw: dict, name: str = "cfg") -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(raw))
    return path


def tensors(model: DeepseekModel) -> dict[str, torch.Tensor]:
    out = {}
    for s in weight_specs(model):
        out[s.name] = s.target
        if s.scale_target is not None:
            out[s.name + "_scale_inv"] = s.scale_target
    return out


def logits(model: DeepseekModel, n: int = 20) -> torch.Tensor:
    """Prefill logits of every token of a fixed prompt, no cache: [n, vocab] float32."""
    ids = torch.arange(n) * 7 % model.config.vocab_size
    meta = build_attn_metadata(torch.arange(4).unsqueeze(0), torch.tensor([0]), torch.tensor([n]), 8)
    with torch.no_grad():
        return model(ids, meta, None, all_logits=True)


# ---- dummy weights ----

def test_dummy_loads_from_config_alone(tmp_path: Path) -> None:
    path = config_dir(tmp_path, SMALL)
    model = load_model(path, load_format="dummy")
    for spec in weight_specs(model):
        assert spec.target.dtype == (torch.float32 if spec.target.dim() == 1 or ".gate." in spec.name
                                     else model.dtype), spec.name
        if spec.name.endswith("norm.weight"):
            assert torch.equal(spec.target, torch.ones_like(spec.target)), spec.name
        elif spec.target.dim() == 2:  # std 1/sqrt(fan_in): every projection keeps its input's scale
            std = spec.target.float().std().item() * spec.target.shape[-1] ** 0.5
            assert 0.8 < std < 1.2, (spec.name, std)
    again, other = load_model(path, load_format="dummy"), load_model(path, load_format="dummy", dummy_seed=1)
    a, b, c = tensors(model), tensors(again), tensors(other)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a if n.endswith("proj.weight"))
    out = logits(model)
    assert out.isfinite().all() and 0.3 < out.std() < 3
    with pytest.raises(ValueError, match="load_format must be one of"):
        load_model(path, load_format="pt")


def test_dummy_bf16_stays_finite_through_61_layers(tmp_path: Path) -> None:
    deep = dict(SMALL, num_hidden_layers=61, first_k_dense_replace=3, hidden_size=512, moe_intermediate_size=128,
                n_routed_experts=16, num_experts_per_tok=8, n_group=4, topk_group=2, vocab_size=1000)
    model = load_model(config_dir(tmp_path, deep), dtype=torch.bfloat16, load_format="dummy")
    ids = torch.arange(16) * 11 % 1000
    meta = build_attn_metadata(torch.arange(2).unsqueeze(0), torch.tensor([0]), torch.tensor([16]), 8)
    with torch.no_grad():
        h = model.forward_layers(model.embed(ids), meta, None)
        out = model.logits(h)
    assert out.isfinite().all() and h.abs().max() < 1e3 and 0.3 < out.std() < 3


@pytest.mark.parametrize("raw", [SMALL, dict(SMALL, quantization_config=FP8)], ids=["bf16", "fp8"])
@pytest.mark.parametrize("keep_fp8", [False, True])
def test_dummy_is_the_same_model_in_every_layout(tmp_path: Path, monkeypatch, raw: dict, keep_fp8: bool) -> None:
    """Each rank generates only its own layers and experts, and its share equals the one-process model's."""
    path = config_dir(tmp_path, raw)
    whole = tensors(load_model(path, load_format="dummy", keep_fp8=keep_fp8))
    read: list[str] = []
    for method in ("read", "read_fp8"):
        original = getattr(DummyReader, method)
        monkeypatch.setattr(DummyReader, method, lambda self, name, *a, _f=original: (read.append(name),
                                                                                       _f(self, name, *a))[1])
    layouts = [ModelSlice(1, 3, 3, ExpertPlacement.contiguous(8, 1, 2), ShardInfo(1, 2)),  # pp x tp x ep
               ModelSlice(0, 2, 3, None, ShardInfo(1, 2), expert_tp=True)]  # tensor-parallel experts
    for layout in layouts:
        read.clear()
        part = load_model(path, model_slice=layout, load_format="dummy", keep_fp8=keep_fp8)
        specs = weight_specs(part)
        assert set(read) == {s.name for s in specs}  # nothing of other layers or experts
        for spec in specs:
            if spec.scale_target is None:
                assert torch.equal(spec.target, spec.take(whole[spec.name])), spec.name
            else:  # kept float8: the share of the weight and of its scales, as stored
                assert torch.equal(spec.target.view(torch.uint8), spec.take(whole[spec.name]).view(torch.uint8))
                assert torch.equal(spec.scale_target, spec.take(whole[spec.name + "_scale_inv"])), spec.name
    if raw is SMALL:
        assert not any(isinstance(m, MoE) and m.fp8_block for m in part.modules())


def test_dummy_fp8_creates_float8_experts_and_scales(tmp_path: Path) -> None:
    path = config_dir(tmp_path, dict(SMALL, quantization_config=FP8))
    kept = load_model(path, load_format="dummy", keep_fp8=True)
    moes = list(kept.moe_layers().values())
    for moe in moes:
        assert moe.w13.dtype == moe.w2.dtype == torch.float8_e4m3fn
        assert moe.w13_scale_inv is not None and moe.w2_scale_inv is not None
        assert moe.w13_scale_inv.shape == (8, 2, 2, 2) and moe.w2_scale_inv.shape == (8, 2, 2)
        assert moe.w13_scale_inv.dtype == torch.float32 and moe.w13_scale_inv.std() > 0  # scales vary by block
        assert moe.dequant is kept.dequant  # one buffer for all layers, reserved before the first step
    assert kept.dequant is not None and kept.dequant.tensor is not None
    assert kept.dequant.tensor.numel() == moes[0].w13.numel() + moes[0].w2.numel()
    assert kept.layers["1"].self_attn.o_proj.dtype == torch.float32  # only routed experts stay float8
    plain = load_model(path, load_format="dummy")
    assert plain.layers["1"].mlp.w13.dtype == torch.float32
    torch.testing.assert_close(logits(kept), logits(plain), rtol=0, atol=0)  # the same model either way
    expert = plain.layers["1"].mlp.w2[3]
    assert 0.8 < expert.std().item() * expert.shape[-1] ** 0.5 < 1.3


# ---- FP8 experts kept in float8 ----

@pytest.mark.parametrize("raw", [SMALL, PARTIAL], ids=["whole_blocks", "partial_blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_fp8_equals_dequantize_on_load(tmp_path: Path, raw: dict, dtype: torch.dtype) -> None:
    path = write_random_checkpoint(raw, tmp_path / "fp8", seed=4, fp8=True)
    kept, loaded = load_model(path, dtype, keep_fp8=True), load_model(path, dtype)
    assert kept.layers["2"].mlp.w13.dtype == torch.float8_e4m3fn and loaded.layers["2"].mlp.w13.dtype == dtype
    for moe in loaded.moe_layers().values():  # the same path as the kept FP8 experts (the CPU kernel's bf16
        moe.cpu_kernel = False                # sums differ from the loop's in the last bit)
    ref = logits(loaded)
    rel = ((logits(kept) - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, f"max|diff|/max|ref| = {rel:.2e}"
    held = sum(p.numel() * p.element_size() for p in kept.parameters())
    assert held < 0.75 * sum(p.numel() * p.element_size() for p in loaded.parameters())


def test_keep_fp8_tp_shards_slice_the_scales(tmp_path: Path) -> None:
    path = write_random_checkpoint(SMALL, tmp_path / "fp8", seed=5, fp8=True)
    whole = load_model(path).layers["1"].mlp
    part = load_model(path, keep_fp8=True, model_slice=ModelSlice(0, 3, 3, None, ShardInfo(1, 2), expert_tp=True))
    moe = part.layers["1"].mlp
    assert moe.w13.dtype == torch.float8_e4m3fn and moe.w2.shape == (8, 256, 128)
    w13, w2 = moe.expert_weights()
    torch.testing.assert_close(w2, whole.w2[:, :, 128:], rtol=0, atol=0)
    torch.testing.assert_close(w13, torch.cat([whole.w13[:, 128:256], whole.w13[:, 384:]], 1), rtol=0, atol=0)
    # a tp slice that would start inside a 128-block is not kept: dequantized on load instead
    odd = write_random_checkpoint(dict(SMALL, moe_intermediate_size=128), tmp_path / "odd", seed=5, fp8=True)
    split = load_model(odd, keep_fp8=True, model_slice=ModelSlice(0, 3, 3, None, ShardInfo(1, 2), expert_tp=True))
    assert split.layers["1"].mlp.w13.dtype == torch.float32 and split.dequant is None


def test_keep_fp8_refuses_experts_stored_unquantized(tmp_path: Path) -> None:
    path = write_random_checkpoint(SMALL, tmp_path / "c", seed=0)
    (path / "config.json").write_text(json.dumps(dict(SMALL, quantization_config=FP8)))
    with pytest.raises(CheckpointError, match=r"experts\.0\.gate_proj\.weight is torch\.float32, but the model "
                                              r"keeps it in float8 .* keep_fp8=False"):
        load_model(path, keep_fp8=True)
    assert load_model(path).layers["1"].mlp.w13.dtype == torch.float32


def test_dequantize_batched_equals_per_matrix() -> None:
    gen = torch.Generator().manual_seed(0)
    pairs = [quantize_fp8(torch.randn(200, 300, generator=gen)) for _ in range(3)]
    weight, scale = torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])
    for dtype in (torch.float32, torch.bfloat16):
        out = dequantize_into(torch.empty(weight.shape, dtype=dtype), weight, scale, (128, 128))
        for i, (q, s) in enumerate(pairs):
            expected = (q.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]).to(dtype)
            assert torch.equal(out[i], expected)


# ---- settings and the command line ----

def test_engine_config_options() -> None:
    assert EngineConfig().effective_keep_fp8 is False and EngineConfig(device="cuda").effective_keep_fp8 is True
    assert EngineConfig(device="cuda", keep_fp8=False).effective_keep_fp8 is False
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy"):
        EngineConfig(load_format="safetensors")


def test_bench_on_dummy_weights_of_a_bare_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config_dir(tmp_path, dict(SMALL, quantization_config=FP8))
    args = ["bench", "--model", str(path), "--load-format", "dummy", "--skip-tokenizer-init", "--keep-fp8",
            "--num-prompts", "2", "--input-len", "5", "--output-len", "3", "--kv-cache-memory", "1000000"]
    assert cli.main(args) == 0
    assert "output tokens/s" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (grouped GEMM and the compiled kernel)")
def test_fp8_experts_on_gpu_equal_dequantized_ones(tmp_path: Path) -> None:
    raw = dict(SMALL, quantization_config=FP8, hidden_size=512, num_attention_heads=8, n_routed_experts=16,
               n_group=4, topk_group=2, num_experts_per_tok=4)
    path, dev = config_dir(tmp_path, raw), torch.device("cuda")
    kept = load_model(path, torch.bfloat16, dev, load_format="dummy", keep_fp8=True)
    plain = load_model(path, torch.bfloat16, dev, load_format="dummy")
    for key, moe in kept.moe_layers().items():  # the compiled kernel against the eager dequantization on load
        w13, w2 = moe.expert_weights()
        assert torch.equal(w13, plain.layers[str(key)].mlp.w13) and torch.equal(w2, plain.layers[str(key)].mlp.w2)
    assert kept.dequant is not None and not kept.dequant._compile_failed
    ids = torch.arange(40, device=dev) * 7 % raw["vocab_size"]
    meta = build_attn_metadata(torch.arange(8, device=dev).unsqueeze(0), torch.tensor([0], device=dev),
                               torch.tensor([40], device=dev), 8)
    with torch.no_grad():
        first, again, other = kept(ids, meta, None, True), kept(ids, meta, None, True), plain(ids, meta, None, True)
    assert torch.equal(first, again) and torch.equal(first, other)  # the grouped path is deterministic too
