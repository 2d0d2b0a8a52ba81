"""The MTP module (model/mtp.py) against a plain-PyTorch reference written from the DeepSeek-V3 report's
equations (oracle_reference.mtp_reference), on tiny random checkpoints with DeepSeek's MTP tensor layout;
loading it from such checkpoints and from dummy weights; and the one-line refusal of a model without it."""

from __future__ import annotations

import oracle_reference
import pytest
import torch

from moeserve.model.attn_metadata import build_attn_metadata
from moeserve.model.loader import MTPError, load_model
from moeserve.model.weights import weight_specs

BLOCK = 8


def mtp_logits(model, ids: list[int]) -> torch.Tensor:
    """The main model over the prompt, then the MTP module over positions 0..T-2 (tokens 1..T-1)."""
    num_blocks = len(ids) // BLOCK + 1
    table = torch.arange(num_blocks).unsqueeze(0)
    caches = {int(i): torch.zeros(num_blocks * BLOCK, model.config.kv_cache_dim) for i in model.layers}
    mtp_cache = torch.zeros(num_blocks * BLOCK, model.config.kv_cache_dim)
    meta = build_attn_metadata(table, torch.tensor([0]), torch.tensor([len(ids)]), BLOCK)
    h = model.norm(model.forward_layers(model.embed(torch.tensor(ids)), meta, caches))
    meta = build_attn_metadata(table, torch.tensor([0]), torch.tensor([len(ids) - 1]), BLOCK)
    out = model.mtp_forward(torch.tensor(ids[1:]), h[:-1], meta, mtp_cache)
    return model.mtp_logits(out)


@pytest.mark.parametrize("variant", ["v3_noaux_norm", "v2_qproj_greedy"])
def test_mtp_matches_reference(ckpt_factory, variant: str) -> None:
    ckpt = ckpt_factory(variant, shards=2 if variant.startswith("v3") else 1, mtp=True)
    ids = [0, 17, 45, 3, 99, 250, 7, 61, 8, 33, 120, 5, 77]
    ref = oracle_reference.mtp_reference(ckpt, ids)
    model = load_model(ckpt, dtype=torch.float32, with_mtp=True)
    with torch.no_grad():
        got = mtp_logits(model, ids)
    assert got.shape == ref.shape == (len(ids) - 1, model.config.vocab_size)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, f"{variant}: MTP logits differ, max|diff|/max|ref| = {rel:.2e}"
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_mtp_shares_embedding_and_head(ckpt_factory) -> None:
    model = load_model(ckpt_factory("v3_noaux_norm", mtp=True), dtype=torch.float32, with_mtp=True)
    names = [s.name for s in weight_specs(model)]
    assert names.count("model.embed_tokens.weight") == 1 and names.count("lm_head.weight") == 1
    assert not any("shared_head.head" in n or f"layers.{model.config.num_hidden_layers}.embed_tokens" in n
                   for n in names)
    assert model.mtp is not None and model.mtp_embed is None


def test_mtp_dummy_weights(ckpt_factory) -> None:
    ckpt = ckpt_factory("v3_noaux_norm", mtp=True)
    model = load_model(ckpt, dtype=torch.float32, load_format="dummy", with_mtp=True)
    assert model.mtp is not None and model.mtp.eh_proj.abs().sum() > 0
    with torch.no_grad():
        assert torch.isfinite(mtp_logits(model, [0, 5, 9, 11, 3])).all()


def test_model_without_mtp_refuses(ckpt_factory) -> None:
    with pytest.raises(MTPError, match="num_nextn_predict_layers") as info:
        load_model(ckpt_factory("v3_noaux_norm"), with_mtp=True)
    assert "\n" not in str(info.value)
