// MLA decode on AMX tiles (mla_decode_amx.cpp), called by mla_decode.cpp where it fits.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace moeserve_kernels {

// whether the tile path runs these shapes here: built with AMX, the tile state granted by the kernel, at most
// 16 heads, a row width of whole 32-value slices, 64-column latent blocks and 16-row cache blocks
bool mla_decode_amx_fits(int64_t heads, int64_t dim, int64_t kv_lora, int64_t block_size);

// mla_decode's contract (checked by it), into out [B, H, kv_lora]
void mla_decode_amx(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables, const at::Tensor& lens,
                    int64_t block_size, int64_t kv_lora, double scale, at::Tensor& out);

// whether the tile path was built and granted here
bool mla_decode_amx_built();

}  // namespace moeserve_kernels
