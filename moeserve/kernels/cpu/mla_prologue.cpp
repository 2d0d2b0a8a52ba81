// MLA's per-token work around attention on CPU, for bfloat16: the rotary embedding of a query's or key's rope
// part, and a step's new latent rows (RMSNorm of the latent, rotated rope part) written into the paged cache.
// Eagerly that is about twenty small ops a layer (gathers of cos and sin, slices, float32 copies, products,
// concatenations, the cache's index_copy_), each a parallel region of its own. Loaded by kernels/cpu_mla.py.
//
// The arithmetic is RotaryEmbedding.forward's and the RMSNorm kernel's (rms_norm.cpp): a pair (x1, x2) --
// (x[2i], x[2i + 1]) with interleave, else (x[i], x[i + d/2]) -- becomes x1 cos - x2 sin at output position i
// and x2 cos + x1 sin at i + d/2, in float32, rounded to bf16 once.

#include "rms_row.h"
#include "row_grain.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <utility>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

inline void rotate(const bf16* x, const float* cos, const float* sin, int64_t half, bool interleave, bf16* out) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(interleave ? x[2 * i] : x[i]);
    const float x2 = static_cast<float>(interleave ? x[2 * i + 1] : x[i + half]);
    out[i] = bf16(x1 * cos[i] - x2 * sin[i]);
    out[i + half] = bf16(x2 * cos[i] + x1 * sin[i]);
  }
}

void check_tables(const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, int64_t rows) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == rows,
              "positions: [T] int64");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.dim() == 2,
              "cos, sin: [max_positions, rope / 2] float32");
}

void check_in_range(const int64_t* v, int64_t n, int64_t limit, const char* what) {
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(v[i] >= 0 && v[i] < limit, what);
}

// whether the bytes from a's first element to its last meet b's (non-negative strides, as rope_into's are)
bool spans_overlap(const at::Tensor& a, const at::Tensor& b) {
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* begin = static_cast<const char*>(t.const_data_ptr());
    return std::make_pair(begin, begin + (last + 1) * t.element_size());
  };
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto [a_begin, a_end] = span(a);
  const auto [b_begin, b_end] = span(b);
  return a_begin < b_end && b_begin < a_end;
}

// x [T, H, P] or [T, P] (last stride 1), positions [T], cos / sin [max_positions, P / 2] -> out (x's shape,
// last stride 1; may be a slice of a wider buffer): x rotated by its token's position
void rope_into(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
               bool interleave, at::Tensor out) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16, "x, out: bfloat16");
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.sizes() == out.sizes() && x.stride(-1) == 1 && out.stride(-1) == 1,
              "x, out: [T, (H,) P] with the last stride 1");
  const int64_t T = x.size(0), H = x.dim() == 3 ? x.size(1) : 1, P = x.size(-1), half = P / 2;
  check_tables(positions, cos, sin, T);
  TORCH_CHECK(P % 2 == 0 && cos.size(1) == half, "rope dims: even, and cos / sin have half of them");
  // NOTE: an interleaved pair (x[2i], x[2i + 1]) lands at out[i] and out[i + P/2], where later pairs still
  // have to be read; the split layout reads and writes the same two places, so out == x (the same elements,
  // exactly) works there, and any other overlap would read values already rotated
  const bool same = x.data_ptr() == out.data_ptr() && x.strides() == out.strides();
  TORCH_CHECK(!spans_overlap(x, out) || (same && !interleave),
              interleave ? "rope_into: out overlaps x, which the interleaved layout cannot rotate in place"
                         : "rope_into: out overlaps x other than exactly in place");
  const int64_t xs0 = x.stride(0), xs1 = x.dim() == 3 ? x.stride(1) : 0;
  const int64_t os0 = out.stride(0), os1 = out.dim() == 3 ? out.stride(1) : 0;
  const bf16* xp = x.const_data_ptr<bf16>();
  bf16* op = out.mutable_data_ptr<bf16>();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  const float* c = cos.const_data_ptr<float>();
  const float* s = sin.const_data_ptr<float>();
  check_in_range(pos, T, cos.size(0), "position out of the rotary table");
  at::parallel_for(0, T, moeserve_kernels::row_grain(H * P * 2), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        rotate(xp + t * xs0 + h * xs1, c + pos[t] * half, s + pos[t] * half, half, interleave, op + t * os0 + h * os1);
      }
    }
  });
}

// kv_a [T, >= R + P] (rows with the last stride 1: the latent's R dims, then the key's P rope dims), weight [R]
// (the latent's RMSNorm), cache [slots, R + P], slots [T] -> cache[slots[t]] = (rmsnorm(latent) * weight,
// rope(k_pe)), as torch.cat([norm(latent), rotary(k_pe)]) and index_copy_ would write them
void mla_write_kv(const at::Tensor& kv_a, const at::Tensor& weight, double eps, const at::Tensor& positions,
                  const at::Tensor& cos, const at::Tensor& sin, bool interleave, at::Tensor cache,
                  const at::Tensor& slots) {
  TORCH_CHECK(kv_a.dim() == 2 && kv_a.scalar_type() == at::kBFloat16 && kv_a.stride(1) == 1, "kv_a: [T, D] bf16 rows");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(), "weight: [R] bfloat16");
  TORCH_CHECK(cache.dim() == 2 && cache.scalar_type() == at::kBFloat16 && cache.is_contiguous(),
              "cache: [slots, R + P] bfloat16");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == kv_a.size(0),
              "slots: [T] int64");
  const int64_t T = kv_a.size(0), R = weight.numel(), W = cache.size(1), P = W - R, half = P / 2;
  TORCH_CHECK(P > 0 && P % 2 == 0 && kv_a.size(1) >= W, "kv_a holds the latent and the rope dims of a cache row");
  check_tables(positions, cos, sin, T);
  TORCH_CHECK(cos.size(1) == half, "cos / sin have half of the rope dims");
  const bf16* src = kv_a.const_data_ptr<bf16>();
  const bf16* wp = weight.const_data_ptr<bf16>();
  bf16* dst = cache.mutable_data_ptr<bf16>();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const float* c = cos.const_data_ptr<float>();
  const float* s = sin.const_data_ptr<float>();
  const int64_t ks = kv_a.stride(0);
  const float e = static_cast<float>(eps);
  check_in_range(pos, T, cos.size(0), "position out of the rotary table");
  check_in_range(slot, T, cache.size(0), "slot out of the cache");
  at::parallel_for(0, T, moeserve_kernels::row_grain(W * 2), [&](int64_t begin, int64_t end) {
    std::vector<float> row(R);
    for (int64_t t = begin; t < end; ++t) {
      const bf16* x = src + t * ks;
      bf16* out = dst + slot[t] * W;
      for (int64_t i = 0; i < R; ++i) row[i] = static_cast<float>(x[i]);
      moeserve_kernels::rms_row(row.data(), wp, R, e, out);  // as rms_norm.cpp computes it
      rotate(x + R, c + pos[t] * half, s + pos[t] * half, half, interleave, out + R);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moeserve_cpu, m) {
  m.def("rope_into(Tensor x, Tensor positions, Tensor cos, Tensor sin, bool interleave, Tensor(a!) out) -> ()");
  m.def("mla_write_kv(Tensor kv_a, Tensor weight, float eps, Tensor positions, Tensor cos, Tensor sin, "
        "bool interleave, Tensor(a!) cache, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(moeserve_cpu, CPU, m) {
  m.impl("rope_into", rope_into);
  m.impl("mla_write_kv", mla_write_kv);
}
