// One row of RMSNorm for bfloat16, shared by rms_norm.cpp and mla_prologue.cpp (the latent's norm in the cache
// write), so the two round alike.
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>

namespace moeserve_kernels {

// row [D] float32 (the bf16 input, widened), weight [D] -> out [D] = bf16(bf16(row * inv) * weight) with
// inv = 1 / sqrt(mean(row^2) + eps): the mean square summed in float32 in index order, x * inv rounded to bf16,
// then the product with the weight rounded to bf16 -- the roundings of model/layers.py's RMSNorm.forward
inline void rms_row(const float* row, const c10::BFloat16* weight, int64_t D, float eps, c10::BFloat16* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < D; ++i) ss += row[i] * row[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; ++i) {
    out[i] = c10::BFloat16(static_cast<float>(c10::BFloat16(row[i] * inv)) * static_cast<float>(weight[i]));
  }
}

}  // namespace moeserve_kernels
