"""MLA's prefill paths (the expanded form, and the absorbed form for short chunks over a long context): the
prefill half of ``MLA`` (``moeserve/model/mla.py``, whose docstring says when each path runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moeserve.model.attn_metadata import AttnMetadata, PaddedPrefill, PrefillMetadata

if TYPE_CHECKING:
    from moeserve.model.cpu_linear import PackedLinear


class MLAPrefill:
    """Mixed into ``MLA``: the attributes below are its."""

    num_heads: int
    kv_lora_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    scale: float
    fused: bool
    prefill_kernel_fits: bool
    absorb_max_query: int
    kv_b_proj: torch.Tensor
    linear: PackedLinear

    def _gather(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _w_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata,
                 out: torch.Tensor) -> None:
        """Expanded MLA over the prefill chunks; writes their rows of ``out`` [T, H, v] in place."""
        prefill = meta.prefill
        assert prefill is not None
        if self.fused and self.prefill_kernel_fits and not kv_cache.requires_grad:
            self._prefill_fused(q_nope, q_pe, kv_cache, prefill, out)
        elif (prefill.max_query_len <= self.absorb_max_query and prefill.max_context_len >= 2 * prefill.max_query_len
              and not kv_cache.requires_grad):
            self._prefill_absorbed(q_nope, q_pe, kv_cache, prefill.padded, out)
        else:
            self._prefill_eager(q_nope, q_pe, kv_cache, prefill.padded, out)

    def _prefill_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                          padded: PaddedPrefill, out: torch.Tensor) -> None:
        """Short chunks over a long context: the decode's absorbed form under the chunks' causal mask; the
        context's latents are never up-projected. Writes the chunks' rows of ``out`` [T, H, v] in place."""
        w_uk, w_uv = self._w_kv_b()
        idx = padded.query_index  # [Bp, Qp]
        q_latent = torch.einsum("bqhn,hnc->bhqc", q_nope[idx], w_uk)  # [Bp, H, Qp, kv_lora]
        q_full = torch.cat([q_latent, q_pe[idx].transpose(1, 2)], dim=-1)  # [Bp, H, Qp, kv_lora + rope]
        context = self._gather(kv_cache, padded.context_slots).unsqueeze(1)  # [Bp, 1, Lp, kv_lora + rope]
        scores = torch.matmul(q_full, context.transpose(-1, -2)).float() * self.scale  # [Bp, H, Qp, Lp]
        scores.masked_fill_(~padded.mask.unsqueeze(1), float("-inf"))
        probs = scores.softmax(dim=-1).to(context.dtype)  # padded query rows are NaN: dropped below
        out_latent = torch.matmul(probs, context)[..., :self.kv_lora_rank]  # [Bp, H, Qp, kv_lora]
        o = torch.einsum("bhqc,hcv->bqhv", out_latent, w_uv)  # [Bp, Qp, H, v]
        valid = padded.query_valid
        out[idx[valid]] = o[valid].to(out.dtype)

    def _up_project(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """context [..., L, kv_lora + rope] -> (k_nope [..., L, H, nope], k_pe [..., L, rope], v [..., L, H, v]),
        views of one kv_b_proj product (k_pe is shared by every head)."""
        latent, k_pe = context.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.linear(latent, self.kv_b_proj, "kv_b_proj").unflatten(-1, (self.num_heads,
                                                                             self.nope_dim + self.v_dim))
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        return k_nope, k_pe, v

    def _prefill_fused(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                       prefill: PrefillMetadata, out: torch.Tensor) -> None:
        """The flash-attention kernel (kernels/mla_prefill.py) over the packed contexts: no mask is built."""
        from moeserve.kernels.mla_prefill import mla_prefill

        # [Nc, kv_lora + rope]: each sequence's cached prefix and new rows, read through its block table
        k_nope, k_pe, v = self._up_project(self._gather(kv_cache, prefill.context_rows))
        mla_prefill(q_nope, q_pe, k_nope, k_pe, v, prefill.query_start, prefill.context_start,
                    prefill.max_query_len, self.scale, out=out)

    def _prefill_eager(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                       padded: PaddedPrefill, out: torch.Tensor) -> None:
        """SDPA over the chunks padded to [Bp, Qp] queries and [Bp, Lp] context rows, under a dense mask."""
        slots = padded.context_slots
        # [Bp, L, kv_lora + rope]; plain indexing where autograd must see it (the no-cache training mode)
        context = kv_cache[slots] if kv_cache.requires_grad else self._gather(kv_cache, slots)
        k_nope, k_pe, v = self._up_project(context)
        k = torch.cat([k_nope.transpose(1, 2), k_pe.unsqueeze(1).expand(-1, self.num_heads, -1, -1)],
                      dim=-1)  # [Bp, H, L, nope + rope]
        # NOTE: torch's CPU flash-attention kernel wants one head width for q, k and v, and SDPA otherwise
        # takes its matmul-softmax path (4x slower for a 4,096-token bf16 prefill); v padded with zero columns
        # to q's width gets the kernel (the padded output columns are zeros, dropped). float32 keeps the
        # matmul-softmax path: its sums are the ones the float32 reference's are compared with.
        pad = k.shape[-1] - self.v_dim if k.device.type == "cpu" and k.dtype != torch.float32 else 0
        v = F.pad(v.transpose(1, 2), (0, pad)) if pad > 0 else v.transpose(1, 2).contiguous()  # [Bp, H, L, v+]
        idx = padded.query_index  # [Bp, Qp]
        q = torch.cat([q_nope[idx], q_pe[idx]], dim=-1).transpose(1, 2).contiguous()  # [Bp, H, Qp, nope + rope]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=padded.mask.unsqueeze(1),
                                           scale=self.scale)  # [Bp, H, Qp, v+]
        o = o[..., :self.v_dim].transpose(1, 2)  # [Bp, Qp, H, v]
        valid = padded.query_valid
        out[idx[valid]] = o[valid].to(out.dtype)
