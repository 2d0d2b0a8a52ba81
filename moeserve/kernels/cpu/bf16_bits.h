// bfloat16 <-> float32 on the raw bits, for the kernels' per-element loops.
//
// c10::BFloat16's conversions round the same way but do not vectorise in these loops (a struct per element, a
// NaN test through std::isnan): a [64, 1024] RMSNorm with its residual add took 90 us on one core, about four
// cycles an element. On the bits, GCC and Clang turn each loop into 16-wide vector code.

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
