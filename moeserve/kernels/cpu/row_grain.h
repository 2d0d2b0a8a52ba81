// How finely the kernels' at::parallel_for splits a step's rows among threads.
//
// at::parallel_for runs min(threads, rows / grain) threads. With grains of 16-64 rows a decode step's tensors (64
// rows of 1-4 KB) ran on 1 to 4 of 16 threads, each pulling its rows from the caches of the cores that wrote them:
// at 16 threads the [64, 1024] RMSNorm took 61 us in the step. A grain of about 8 KB a thread lets all of them
// share the copying; a prefill step's thousands of rows still split evenly, one chunk a thread.

#pragma once

#include <algorithm>
#include <cstdint>

namespace moeserve_kernels {

constexpr int64_t kMinChunkBytes = 8192;

// the grain (rows) for rows of row_bytes bytes each
inline int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, kMinChunkBytes / std::max<int64_t>(1, row_bytes));
}

}  // namespace moeserve_kernels
