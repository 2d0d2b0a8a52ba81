// MLA's absorbed decode attention on CPU, read straight from the paged latent cache. Loaded by
// kernels/cpu_mla.py (the same library as moe_experts.cpp).
//
// Per sequence and group of heads: the context's latent rows are read through the block table (no gathered
// copy), scores against every head's absorbed query in float32, softmax online over chunks of tokens, and the
// probability-weighted sum of the rows' latent part. The eager path (model/mla.py: MLA._decode) gathers the
// context, multiplies twice through oneDNN, rounds the scores to bf16 and reads the context three times.

#include "mla_decode_amx.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define MOESERVE_AVX512_BF16 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kHeadGroup = 16;  // heads per work item
constexpr int64_t kChunk = 64;      // tokens per online-softmax step

// f(std::integral_constant<int64_t, NH>) for the head counts compiled for: NH = 8 or kHeadGroup where nh is
// one of them (the loops over heads unrolled), else NH = 0 (nh read at run time)
template <class F>
inline void by_head_count(int64_t nh, F&& f) {
  if (nh == 8) {
    f(std::integral_constant<int64_t, 8>{});
  } else if (nh == kHeadGroup) {
    f(std::integral_constant<int64_t, kHeadGroup>{});
  } else {
    f(std::integral_constant<int64_t, 0>{});
  }
}

// out[h] = sum over i of q[h * n + i] * row[i] for h < nh (nh <= kHeadGroup): the heads' chains are independent,
// so the micro-ops overlap instead of waiting on one accumulator. NH > 0: nh == NH known at compile time, so
// the accumulators stay in registers (with a run-time count gcc keeps them on the stack: a load and a store
// around every dpbf16)
template <int64_t NH>
inline void dot_heads_bf16(const bf16* q, const bf16* row, int64_t n, int64_t nh, float* out) {
  if constexpr (NH > 0) nh = NH;
  int64_t i = 0;
#ifdef MOESERVE_AVX512_BF16
  __m512 acc[kHeadGroup];
  for (int64_t h = 0; h < nh; ++h) acc[h] = _mm512_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    const __m512bh r = (__m512bh)_mm512_loadu_si512(row + i);
    for (int64_t h = 0; h < nh; ++h) acc[h] = _mm512_dpbf16_ps(acc[h], (__m512bh)_mm512_loadu_si512(q + h * n + i), r);
  }
  for (int64_t h = 0; h < nh; ++h) out[h] = _mm512_reduce_add_ps(acc[h]);
#else
  for (int64_t h = 0; h < nh; ++h) out[h] = 0.0f;
#endif
  for (; i < n; ++i) {
    for (int64_t h = 0; h < nh; ++h) out[h] += static_cast<float>(q[h * n + i]) * static_cast<float>(row[i]);
  }
}

// acc[h][c] = acc[h][c] * rescale[h] + sum over j < n of p[h][j] * rows[j][c], for h < nh and c < width. With
// AVX-512 BF16 two rows at a time: their columns interleaved in pairs, each head's two probabilities (rounded
// to bf16, as the eager path rounds them) broadcast, one dpbf16 per 16 columns and head; a block of 16 columns
// of every head's accumulator stays in registers while the chunk's rows stream past
template <int64_t NH>
inline void accumulate_chunk(float* acc, const float* p, const float* rescale, const bf16* const* rows, int64_t n,
                             int64_t nh, int64_t width) {
  if constexpr (NH > 0) nh = NH;
  int64_t c = 0;
#ifdef MOESERVE_AVX512_BF16
  uint32_t pairs[kHeadGroup][kChunk / 2];
  const int64_t np = (n + 1) / 2;
  for (int64_t h = 0; h < nh; ++h) {
    for (int64_t k = 0; k < np; ++k) {
      const uint32_t lo = bf16(p[h * kChunk + 2 * k]).x;
      const uint32_t hi = 2 * k + 1 < n ? bf16(p[h * kChunk + 2 * k + 1]).x : 0;
      pairs[h][k] = lo | (hi << 16);
    }
  }
  alignas(64) static const uint16_t kInterleave[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i order = _mm512_load_si512(kInterleave);
  for (; c + 16 <= width; c += 16) {
    __m512 a[kHeadGroup];
    for (int64_t h = 0; h < nh; ++h) a[h] = _mm512_mul_ps(_mm512_loadu_ps(acc + h * width + c), _mm512_set1_ps(rescale[h]));
    for (int64_t k = 0; k < np; ++k) {
      const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2 * k] + c));
      const __m256i r1 = 2 * k + 1 < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2 * k + 1] + c))
                                       : _mm256_setzero_si256();
      const __m512bh v = (__m512bh)_mm512_permutex2var_epi16(_mm512_castsi256_si512(r0), order,
                                                             _mm512_castsi256_si512(r1));
      for (int64_t h = 0; h < nh; ++h) {
        a[h] = _mm512_dpbf16_ps(a[h], (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[h][k])), v);
      }
    }
    for (int64_t h = 0; h < nh; ++h) _mm512_storeu_ps(acc + h * width + c, a[h]);
  }
#endif
  for (; c < width; ++c) {
    for (int64_t h = 0; h < nh; ++h) {
      float v = acc[h * width + c] * rescale[h];
      for (int64_t j = 0; j < n; ++j) v += p[h * kChunk + j] * static_cast<float>(rows[j][c]);
      acc[h * width + c] = v;
    }
  }
}

// q [B, H, D] bf16 (absorbed query: kv_lora then rope), cache [slots, D] bf16, block_tables [B, nb] int64,
// context_lens [B] int64 -> [B, H, kv_lora] bf16. ``tiles``: on AMX tiles where they fit (mla_decode_amx.cpp),
// else (and where not) the AVX-512 path below
at::Tensor mla_decode(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                      const at::Tensor& context_lens, int64_t block_size, int64_t kv_lora, double scale, bool tiles) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kBFloat16 && q.is_contiguous(), "q: [B, H, D] bfloat16");
  TORCH_CHECK(cache.dim() == 2 && cache.scalar_type() == at::kBFloat16 && cache.stride(1) == 1,
              "cache: [slots, D] bfloat16");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block tables and context lengths: int64");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(cache.size(1) == D && kv_lora <= D, "cache rows and the query differ in width");
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const int64_t nb = tables.size(1), row_stride = cache.stride(0);
  at::Tensor out = at::empty({B, H, kv_lora}, q.options());
  if (tiles && moeserve_kernels::mla_decode_amx_fits(H, D, kv_lora, block_size)) {
    moeserve_kernels::mla_decode_amx(q, cache, tables, lens, block_size, kv_lora, scale, out);
    return out;
  }
  const bf16* qp = q.const_data_ptr<bf16>();
  const bf16* cp = cache.const_data_ptr<bf16>();
  const int64_t* tp = tables.const_data_ptr<int64_t>();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  bf16* op = out.mutable_data_ptr<bf16>();
  const int64_t groups = (H + kHeadGroup - 1) / kHeadGroup;
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kHeadGroup * kChunk), acc(kHeadGroup * kv_lora);
    const bf16* rows[kChunk];
    float run_max[kHeadGroup], run_sum[kHeadGroup];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / groups, h0 = (item % groups) * kHeadGroup;
      const int64_t nh = std::min(kHeadGroup, H - h0), L = lp[b];
      const bf16* qb = qp + (b * H + h0) * D;
      std::fill(acc.begin(), acc.begin() + nh * kv_lora, 0.0f);
      std::fill(run_max, run_max + nh, -1e30f);  // finite: -ffast-math assumes no infinities
      std::fill(run_sum, run_sum + nh, 0.0f);
      for (int64_t j0 = 0; j0 < L; j0 += kChunk) {
        const int64_t n = std::min(kChunk, L - j0);
        for (int64_t j = 0; j < n; ++j) {  // the chunk's rows, through the block table
          const int64_t pos = j0 + j;
          rows[j] = cp + (tp[b * nb + pos / block_size] * block_size + pos % block_size) * row_stride;
        }
        float scores[kHeadGroup];
        for (int64_t j = 0; j < n; ++j) {
          by_head_count(nh, [&](auto NH) { dot_heads_bf16<NH.value>(qb, rows[j], D, nh, scores); });
          for (int64_t h = 0; h < nh; ++h) s[h * kChunk + j] = scores[h] * sc;
        }
        float rescale[kHeadGroup];
        for (int64_t h = 0; h < nh; ++h) {  // online softmax: the chunk's exponents, the running max and sum
          float* sh = s.data() + h * kChunk;
          float m = run_max[h];
          for (int64_t j = 0; j < n; ++j) m = std::max(m, sh[j]);
          rescale[h] = std::exp(run_max[h] - m);  // 0 on the first chunk (underflow)
          float sum = 0.0f;
          for (int64_t j = 0; j < n; ++j) {
            sh[j] = std::exp(sh[j] - m);
            sum += sh[j];
          }
          run_sum[h] = run_sum[h] * rescale[h] + sum;
          run_max[h] = m;
        }
        by_head_count(nh, [&](auto NH) {
          accumulate_chunk<NH.value>(acc.data(), s.data(), rescale, rows, n, nh, kv_lora);
        });
      }
      for (int64_t h = 0; h < nh; ++h) {
        const float inv = run_sum[h] > 0.0f ? 1.0f / run_sum[h] : 0.0f;
        bf16* dst = op + (b * H + h0 + h) * kv_lora;
        const float* ah = acc.data() + h * kv_lora;
        for (int64_t c = 0; c < kv_lora; ++c) dst[c] = bf16(ah[c] * inv);
      }
    }
  });
  return out;
}

bool mla_tiles() { return moeserve_kernels::mla_decode_amx_built(); }

bool mla_vectorized() {
#ifdef MOESERVE_AVX512_BF16
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moeserve_cpu, m) {
  m.def("mla_vectorized() -> bool");
  m.def("mla_tiles() -> bool");
  m.def("mla_decode(Tensor q, Tensor cache, Tensor block_tables, Tensor context_lens, int block_size, "
        "int kv_lora, float scale, bool tiles=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeserve_cpu, CPU, m) { m.impl("mla_decode", mla_decode); }

TORCH_LIBRARY_IMPL(moeserve_cpu, CompositeExplicitAutograd, m) {
  m.impl("mla_vectorized", mla_vectorized);
  m.impl("mla_tiles", mla_tiles);
}
