// One row of RMSNorm for bfloat16, shared by rms_norm.cpp and mla_prologue.cpp (the latent's norm in the cache
// write), so the two round alike.
#pragma once

#include "bf16_bits.h"

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>

namespace moeserve_kernels {

// row [D] float32 (the bf16 input, widened), weight [D] -> out [D] = bf16(bf16(row * inv) * weight) with
// inv = 1 / sqrt(mean(row^2) + eps): the mean square summed in float32 in index order, x * inv rounded to bf16,
// then the product with the weight rounded to bf16 -- the roundings of model/layers.py's RMSNorm.forward
inline void rms_row(const float* __restrict row, const c10::BFloat16* __restrict weight, int64_t D, float eps,
                    c10::BFloat16* __restrict out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < D; ++i) ss += row[i] * row[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; ++i) {
    out[i] = to_bf16(to_float(to_bf16(row[i] * inv)) * to_float(weight[i]));
  }
}

}  // namespace moeserve_kernels
