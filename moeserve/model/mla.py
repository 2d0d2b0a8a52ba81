"""Multi-head Latent Attention (DeepSeek-V2/V3) over a paged latent cache, on local shapes.

The cache holds, per token and layer, only the normalised compressed latent ``c_kv`` [kv_lora_rank] and the
rotated decoupled key ``k_pe`` [qk_rope_head_dim] -- never per-head K/V.

* Prefill chunks use the expanded form: context latents (a chunk's cached prefix and its new rows) are
  up-projected by ``kv_b_proj`` into per-head keys/values and attended causally: eagerly with SDPA under a
  dense mask, or with the flash-attention kernel (``kernels/mla_prefill.py``) over the packed contexts.
* Decode uses the absorbed form: ``q_nope`` is multiplied into ``W_UK`` so scores are taken directly against
  the latents, and the latent output is multiplied by ``W_UV``. No per-head K/V is ever built.
* Short prefill chunks over a longer cached context (the last partial block of a prompt whose prefix came from
  the prefix cache, the KV store or a prefill instance) use the absorbed form too, under the chunk's causal
  mask, on the eager path: up-projecting an L-token context costs L x kv_lora x H x (nope + v) per layer,
  where the absorbed scores cost Q x L x H x (kv_lora + rope) x 2, far less for Q tokens well below
  (nope + v) / 2. (vLLM's MLA backends route short queries to their decode kernels the same way.)
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.comm.shard import SINGLE, ShardInfo
from moeserve.kernels import cpu_mla
from moeserve.model.attn_metadata import AttnMetadata
from moeserve.model.config import ModelConfig
from moeserve.model.cpu_linear import PackedLinear
from moeserve.model.layers import RMSNorm, RotaryEmbedding
from moeserve.model.mla_prefill import MLAPrefill

# prefill chunks of at most this many tokens, over a context at least twice as long, take the absorbed form
ABSORB_MAX_QUERY = 32
# decode queries up to which the cache-write kernel also absorbs them (W_UK): one batched GEMM fewer a layer,
# where each of its programs re-reading a head's weight columns costs less than the GEMM's launch
ABSORB_IN_ROWS_MAX_QUERIES = 4


class MLA(MLAPrefill, nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype | None = None,
                 shard: ShardInfo = SINGLE):
        super().__init__()
        # tensor parallel: heads are split over the shard; the latent projections (q_a, kv_a) are replicated,
        # and o_proj's partial sums are reduced -- the one collective of this layer
        self.shard = shard
        self.num_heads = shard.split(config.num_attention_heads, "num_attention_heads")
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.scale = config.softmax_scale
        self.rotary = rotary
        hidden, qk_dim = config.hidden_size, config.qk_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Parameter(torch.empty(self.num_heads * qk_dim, hidden, dtype=dtype))
        else:
            self.q_a_proj = nn.Parameter(torch.empty(self.q_lora_rank, hidden, dtype=dtype))
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps, dtype)
            self.q_b_proj = nn.Parameter(torch.empty(self.num_heads * qk_dim, self.q_lora_rank, dtype=dtype))
        self.kv_a_proj_with_mqa = nn.Parameter(torch.empty(config.kv_cache_dim, hidden, dtype=dtype))
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps, dtype)
        self.kv_b_proj = nn.Parameter(
            torch.empty(self.num_heads * (self.nope_dim + self.v_dim), self.kv_lora_rank, dtype=dtype))
        self.o_proj = nn.Parameter(torch.empty(hidden, self.num_heads * self.v_dim, dtype=dtype))
        self.linear = PackedLinear()
        # the paged decode and the prefill kernels (kernels/mla_*.py); set by DeepseekModel.use_kernels
        self.fused = False
        self.absorb_max_query = ABSORB_MAX_QUERY  # 0: every prefill chunk in the expanded form
        # the kernel tiles the latent and rope parts padded to powers of two (96 -> 128); its tiles are sized
        # for DeepSeek's widths (512 + 64) and no larger
        self.decode_kernel_fits = self.kv_lora_rank <= 512 and self.rope_dim <= 64
        # the prefill kernel's tiles hold DeepSeek's head widths (nope 128 + rope 64, v 128) and no larger
        self.prefill_kernel_fits = self.nope_dim <= 128 and self.rope_dim <= 64 and self.v_dim <= 128

    def _gather(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """rows[index] for index [B, L] -> [B, L, D], into a grow-only scratch buffer.

        NOTE: a fresh multi-megabyte tensor per layer and step is served by mmap and page-faulted in on every
        call, which cost more than the gather itself on CPU; reusing one buffer avoids that."""
        n, dim = index.numel(), rows.shape[-1]
        buf = getattr(self, "_scratch", None)
        if buf is None or buf.numel() < n * dim or buf.dtype != rows.dtype or buf.device != rows.device:
            buf = torch.empty(max(n * dim, 1), dtype=rows.dtype, device=rows.device)
            self._scratch = buf
        out = buf[:n * dim].view(n, dim)
        torch.index_select(rows, 0, index.flatten(), out=out)
        return out.view(*index.shape, dim)

    def fuse_input_projections(self) -> None:
        """Make the two projections of the layer's input -- the query's (``q_proj``, or ``q_a_proj`` with a
        query LoRA) and the latent's (``kv_a_proj_with_mqa``) -- row blocks of one weight, so that a step runs
        one GEMM for both: at decode sizes each is a small matrix-vector product whose launch and ramp weigh
        more than its bytes. The two parameters become views of the fused weight (no memory is added); a
        weight replaced afterwards (rather than copied into) turns the fused GEMM off again."""
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        fused = torch.cat([first.detach(), self.kv_a_proj_with_mqa.detach()])
        first.data = fused[:first.shape[0]]
        self.kv_a_proj_with_mqa.data = fused[first.shape[0]:]
        self._input_proj = fused

    def _project_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (the query projection's output -- q, or q_a before its norm --, the latent
        projection's [T, kv_lora + rope])."""
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        fused = getattr(self, "_input_proj", None)
        if fused is not None and first.data_ptr() == fused.data_ptr():
            return self.linear(x, fused, "input_proj").split([first.shape[0], self.kv_a_proj_with_mqa.shape[0]], -1)
        return self.linear(x, first, "q_proj" if self.q_lora_rank is None else "q_a_proj"), \
            self.linear(x, self.kv_a_proj_with_mqa, "kv_a")

    def _query(self, x: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """-> [T, H, nope + rope] from ``projected``, the query projection's output for ``x``."""
        q = projected if self.q_lora_rank is None else \
            self.linear(self.q_a_layernorm(projected), self.q_b_proj, "q_b_proj")
        return q.view(x.shape[0], self.num_heads, self.nope_dim + self.rope_dim)

    def forward(self, x: torch.Tensor, meta: AttnMetadata, kv_cache: torch.Tensor | None) -> torch.Tensor:
        """x: [T, hidden]; kv_cache: [num_slots, kv_lora_rank + rope_dim] (flat view) or None (no cache:
        the step's own tokens are the whole context, as in training) -> [T, hidden]."""
        projected, kv_a = self._project_input(x)
        q = self._query(x, projected)  # [T, H, nope + rope]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        num_dec = meta.num_decode_tokens
        fused_rows = kv_cache is not None and self.fused and self.rotary.kernel_fits and kv_a.stride(-1) == 1
        # the cache-write kernel rotates the decode query's rope part too (one launch fewer a layer)
        q_pe_dec = q_pe[:num_dec]  # before the prefill tokens' rotation below replaces q_pe
        q_full = self._decode_query(q_pe_dec, meta.positions[:num_dec], rotate=not fused_rows) if num_dec else None
        if q_full is None or meta.num_prefill_seqs:
            q_pe = self.rotary(q_pe, meta.positions)
        absorbed = False
        if fused_rows:
            from moeserve.kernels.mla_kv_write import write_kv_rows

            assert kv_cache is not None

            q_rope = q_absorb = None
            if q_full is not None:
                q_rope = (q_pe_dec, q_full[..., self.kv_lora_rank:])
                # a few decode queries: their absorbed latent parts in the same launch (no batched GEMM in _decode)
                absorbed = num_dec <= ABSORB_IN_ROWS_MAX_QUERIES
                q_absorb = (q_nope[:num_dec], self._w_kv_b()[0], q_full[..., :self.kv_lora_rank]) if absorbed else None
            write_kv_rows(kv_a, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, meta.positions,
                          self.rotary.cos, self.rotary.sin, self.rotary.interleave, kv_cache, meta.slot_mapping,
                          q_rope, q_absorb)
        elif kv_cache is not None and cpu_mla.write_kv_applies(kv_a, self.kv_a_layernorm.weight, kv_cache,
                                                                self.rotary.cos):
            cpu_mla.write_kv_rows(kv_a, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, meta.positions,
                                  self.rotary.cos, self.rotary.sin, self.rotary.interleave, kv_cache,
                                  meta.slot_mapping)
        else:
            latent, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            new_rows = torch.cat([self.kv_a_layernorm(latent), self.rotary(k_pe, meta.positions)], dim=-1)
            if kv_cache is None:
                kv_cache = new_rows  # slot_mapping is the identity in this mode
            else:
                kv_cache.index_copy_(0, meta.slot_mapping, new_rows.to(kv_cache.dtype))
        out = x.new_empty(x.shape[0], self.num_heads, self.v_dim)
        if num_dec:
            self._decode(q_nope[:num_dec], q_pe[:num_dec], kv_cache, meta, out[:num_dec], q_full,
                         absorbed=absorbed)
        if meta.num_prefill_seqs:
            self._prefill(q_nope, q_pe, kv_cache, meta, out)
        return self.shard.all_reduce(self.linear(out.flatten(1), self.o_proj, "o_proj"))

    def _w_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (W_UK [H, nope, kv_lora], W_UV^T [H, kv_lora, v]), the two halves of kv_b_proj as decode uses them.

        Contiguous copies, made once per weight version (the decode einsums would otherwise re-copy the
        strided views at every step)."""
        key = (self.kv_b_proj.data_ptr(), self.kv_b_proj._version)
        if getattr(self, "_absorbed_key", None) != key:
            w = self.kv_b_proj.detach().view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            self._absorbed = (w[:, :self.nope_dim].contiguous(), w[:, self.nope_dim:].transpose(1, 2).contiguous())
            self._absorbed_key = key
        return self._absorbed

    def _decode_query(self, q_pe: torch.Tensor, positions: torch.Tensor, rotate: bool = True) -> torch.Tensor | None:
        """The decode query buffer [B, H, kv_lora + rope], its rope part rotated in place (``_decode`` writes
        the latent part): no concatenation. None unless a kernel rotates it (the GPU's fused path, or bf16 on
        CPU: ``cpu_mla.rope_into``). ``rotate=False``: the caller has the cache-write kernel rotate it."""
        if not ((self.fused and self.decode_kernel_fits) or cpu_mla.rope_applies(q_pe, self.rotary.cos)):
            return None
        q_full = q_pe.new_empty(q_pe.shape[0], self.num_heads, self.kv_lora_rank + self.rope_dim)
        if rotate:
            self.rotary(q_pe, positions, out=q_full[..., self.kv_lora_rank:])
        return q_full

    def _decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata,
                out: torch.Tensor, q_full: torch.Tensor | None = None, absorbed: bool = False) -> None:
        """Absorbed MLA for one new token per sequence: q_nope [B, H, nope], q_pe [B, H, rope] (rotated) ->
        ``out`` [B, H, v] (rows of the step's output). ``q_full``: ``_decode_query``'s buffer, whose rope part
        is already rotated (``q_pe`` is then not read); ``absorbed``: its latent part is written too (the
        cache-write kernel did it)."""
        w_uk, w_uv = self._w_kv_b()
        if q_full is None:
            q_latent = torch.einsum("bhn,hnc->bhc", q_nope, w_uk)  # [B, H, kv_lora]
            q_full = torch.cat([q_latent, q_pe], dim=-1)  # [B, H, kv_lora + rope]
        elif not absorbed:  # the GEMM writes the latent part through the [H, B, kv_lora] view
            torch.bmm(q_nope.transpose(0, 1), w_uk, out=q_full.transpose(0, 1)[..., :self.kv_lora_rank])
        if self.fused and self.decode_kernel_fits:
            from moeserve.kernels.mla_decode import mla_decode

            # NOTE: the up-projection by W_UV folded into the merge kernel at up to 4 sequences (one launch fewer)
            # was slower on an H100: 2.854 against 2.708 ms a V2-Lite step at batch 1 (BENCHMARKS.md, issue 20's
            # fifteenth pass). Each program streamed its head's weight slice after the merge, in series
            out_latent = mla_decode(q_full, kv_cache, meta.decode_block_tables, meta.decode_context_lens,
                                    meta.block_size, self.kv_lora_rank, self.scale)
        elif cpu_mla.applies(q_full, kv_cache):
            out_latent = cpu_mla.mla_decode(q_full, kv_cache, meta.decode_block_tables, meta.decode_context_lens,
                                            meta.block_size, self.kv_lora_rank, self.scale)
        else:
            out_latent = self._decode_eager(q_full, kv_cache, meta)
        if self.fused:  # NOTE: the GEMM writes the [H, B, v] view of ``out`` in place: no copy kernel after it
            torch.bmm(out_latent.transpose(0, 1), w_uv, out=out.transpose(0, 1))
        else:
            out.copy_(torch.einsum("bhc,hcv->bhv", out_latent, w_uv))

    def _decode_eager(self, q_full: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """q_full [B, H, kv_lora + rope] against the gathered contexts -> the latent output [B, H, kv_lora],
        each group of similar lengths (``decode_length_groups``) padded to its own longest."""
        groups = meta.decode_length_groups
        if len(groups) == 1:
            return self._decode_padded(q_full, kv_cache, meta.decode_block_tables, meta.decode_context_valid,
                                       meta.block_size)
        out = q_full.new_empty(*q_full.shape[:2], self.kv_lora_rank)
        for rows, num_blocks in groups:
            out[rows] = self._decode_padded(q_full[rows], kv_cache, meta.decode_block_tables[rows, :num_blocks],
                                            meta.decode_context_valid[rows, :num_blocks * meta.block_size],
                                            meta.block_size)
        return out

    def _decode_padded(self, q_full: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor,
                       valid: torch.Tensor, block_size: int) -> torch.Tensor:
        # whole blocks are gathered (block_size rows per index), then viewed as [B, nb * block_size, D]
        blocks = kv_cache.view(-1, block_size * kv_cache.shape[-1])
        context = self._gather(blocks, tables).view(q_full.shape[0], -1, kv_cache.shape[-1])
        scores = torch.bmm(q_full, context.transpose(1, 2)).float() * self.scale  # [B, H, L]
        scores.masked_fill_(~valid.unsqueeze(1), float("-inf"))
        probs = scores.softmax(dim=-1).to(context.dtype)
        # NOTE: multiplying by the whole row and dropping the rope part after is cheaper than the copy that a
        # non-contiguous context[..., :kv_lora] operand would cost
        return torch.bmm(probs, context)[..., :self.kv_lora_rank]  # [B, H, kv_lora]
