// RMSNorm (with the residual add before it) on CPU for bfloat16 rows, in one pass over each row. Loaded by
// kernels/cpu_norm.py (the same library as moe_experts.cpp).
//
// Torch's composite (model/layers.py: RMSNorm.forward) makes a float32 copy of the rows, squares it, sums,
// scales, rounds back to bf16 and multiplies by the weight: seven passes over [T, hidden] float32 tensors,
// 18% of a 4,096-token prefill step on one core. The steps and their roundings are the same here: the sum
// residual + x rounded to bf16, its mean square in float32, x * rsqrt(ms + eps) rounded to bf16, times the
// weight rounded to bf16; only the order of the mean's float32 additions differs.

#include "rms_row.h"
#include "row_grain.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace {

using bf16 = c10::BFloat16;
using moeserve_kernels::to_bf16;
using moeserve_kernels::to_float;

// x [T, D], weight [D], residual [T, D] or none -> (norm(residual + x) * weight, residual + x)
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: [T, D] bfloat16 rows");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight: [D] bfloat16");
  const int64_t T = x.size(0), D = x.size(1), xs = x.stride(0);
  const bool add = residual.has_value();
  int64_t rs = 0;
  if (add) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == at::kBFloat16 && residual->stride(1) == 1,
                "residual: [T, D] bfloat16 rows");
    rs = residual->stride(0);
  }
  at::Tensor out = at::empty({T, D}, x.options());
  at::Tensor total = add ? at::empty({T, D}, x.options()) : x;
  const bf16* xp = x.const_data_ptr<bf16>();
  const bf16* rp = add ? residual->const_data_ptr<bf16>() : nullptr;
  const bf16* wp = weight.const_data_ptr<bf16>();
  bf16* op = out.mutable_data_ptr<bf16>();
  bf16* tp = add ? total.mutable_data_ptr<bf16>() : nullptr;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, moeserve_kernels::row_grain(D * 2), [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t t = begin; t < end; ++t) {
      const bf16* src = xp + t * xs;
      float* __restrict w = row.data();
      if (add) {
        // the sum rounded to bf16 (as the composite's residual + x), kept widened in row, then stored: two
        // loops of one store each, which vectorise where one loop with both stores did not
        const bf16* r = rp + t * rs;
        for (int64_t i = 0; i < D; ++i) w[i] = to_float(to_bf16(to_float(r[i]) + to_float(src[i])));
        bf16* __restrict dst = tp + t * D;
        for (int64_t i = 0; i < D; ++i) dst[i] = to_bf16(w[i]);
      } else {
        for (int64_t i = 0; i < D; ++i) w[i] = to_float(src[i]);
      }
      moeserve_kernels::rms_row(row.data(), wp, D, e, op + t * D);
    }
  });
  return {out, total};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moeserve_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moeserve_cpu, CPU, m) { m.impl("rms_norm", rms_norm); }
