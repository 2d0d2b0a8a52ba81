// bfloat16 <-> float32 on the raw bits, for the kernels' per-element loops.
//
// c10::BFloat16 rounds the same way, but its NaN test goes through std::isnan, which the kernels' -ffast-math
// lets the compiler assume away; here NaN is tested on the bits. Loops of these with one store each vectorise
// (rms_norm.cpp: its residual add with two stores in one loop did not, 90 us on one core for [64, 1024] rows,
// 49 us as two loops).

#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace moeserve_kernels {

inline float to_float(c10::BFloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// round to nearest even, as c10::BFloat16(float); NaN -> the quiet NaN 0x7FC0 (tested on the bits, so
// -ffast-math's finite-math assumption cannot drop the test)
inline c10::BFloat16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

}  // namespace moeserve_kernels
