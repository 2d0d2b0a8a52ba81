// The routed experts of a MoE layer on CPU in one call, on oneDNN's batch-reduce GEMM micro-kernel (AMX tiles
// for bf16; PyTorch exports it as at::native::cpublas::brgemm). Loaded by kernels/cpu_moe.py.
//
// Inputs: the (token, expert) pairs sorted by expert -- xs [P, H] the pairs' rows, offsets [E + 1] where each
// expert's pairs start, pair_weights [P] their routing weights -- and the experts' weights packed once by
// pack_experts. Work is split over (expert, block of 32 rows, block of 32 output columns): every core reads
// a share of every active expert's weights, with no Python between the products. silu(gate) * up and the
// routing weight are applied to each block as it leaves the micro-kernel; each token's pairs are summed in
// float32, in a fixed order (its top-k order), so the result does not depend on the thread count.

#include "row_grain.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlockN = 32;  // output columns per micro-kernel call (the packed weights' block)
constexpr int64_t kBlockM = 32;  // rows per micro-kernel call

using bf16 = c10::BFloat16;

// w [E, N, K] (a linear layer's weight per expert: N outputs of K inputs) -> [E, N / 32, K / 2, 32, 2]: each
// block of 32 outputs in the micro-kernel's VNNI layout (pairs of consecutive K interleaved)
at::Tensor pack_experts(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kBFloat16, "pack_experts: w must be [E, N, K] bfloat16");
  const int64_t E = w.size(0), N = w.size(1), K = w.size(2);
  TORCH_CHECK(N % kBlockN == 0 && K % 2 == 0, "pack_experts: N must be a multiple of 32 and K even");
  const at::Tensor wt = w.transpose(1, 2).contiguous();  // [E, K, N]: the micro-kernel's B, row-major
  at::Tensor out = at::empty(w.sizes(), w.options());
  const bf16* src = wt.const_data_ptr<bf16>();
  bf16* dst = out.mutable_data_ptr<bf16>();
  const int64_t nb = N / kBlockN;
  at::parallel_for(0, E * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = i / nb, b = i % nb;
      at::native::cpublas::pack(K, kBlockN, N, kBlockN, at::kBFloat16, at::kBFloat16,
                                src + e * K * N + b * kBlockN, dst + i * K * kBlockN);
    }
  });
  return out;
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// -> [P, H] float32: pair_weights[p] * expert(xs[p]) for every pair p (rows of experts held elsewhere: none,
// the caller leaves them out of xs)
at::Tensor expert_pairs(const at::Tensor& xs, const at::Tensor& offsets, const at::Tensor& w13, const at::Tensor& w2,
                        const at::Tensor& pair_weights) {
  TORCH_CHECK(xs.dim() == 2 && xs.scalar_type() == at::kBFloat16 && xs.is_contiguous(), "xs: [P, H] bfloat16");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous(), "offsets: int64");
  TORCH_CHECK(pair_weights.scalar_type() == at::kFloat && pair_weights.is_contiguous(), "pair_weights: float32");
  TORCH_CHECK(w13.scalar_type() == at::kBFloat16 && w2.scalar_type() == at::kBFloat16 && w13.is_contiguous() &&
                  w2.is_contiguous(), "w13, w2: bfloat16, as pack_experts returns them");
  const int64_t P = xs.size(0), H = xs.size(1);
  const int64_t E = w13.size(0), I = w13.size(1) / 2;
  TORCH_CHECK(w13.size(2) == H && w2.size(0) == E && w2.size(1) == H && w2.size(2) == I, "expert shapes");
  TORCH_CHECK(I % kBlockN == 0 && H % kBlockN == 0, "H and I must be multiples of 32");
  TORCH_CHECK(offsets.size(0) == E + 1, "offsets: [E + 1]");
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  std::vector<int64_t> active;  // experts with pairs here
  for (int64_t e = 0; e < E; ++e) {
    if (off[e + 1] > off[e]) active.push_back(e);
  }
  at::Tensor act = at::empty({P, I}, xs.options());
  at::Tensor y = at::empty({P, H}, xs.options().dtype(at::kFloat));
  const bf16* x = xs.const_data_ptr<bf16>();
  const bf16* b13 = w13.const_data_ptr<bf16>();
  const bf16* b2 = w2.const_data_ptr<bf16>();
  const float* pw = pair_weights.const_data_ptr<float>();
  bf16* a = act.mutable_data_ptr<bf16>();
  float* out = y.mutable_data_ptr<float>();
  const int64_t nb13 = 2 * I / kBlockN, nb_i = I / kBlockN, nb_h = H / kBlockN;
  const int64_t num_active = static_cast<int64_t>(active.size());

  // gate and up: block b of the gate's outputs and block b of up's, silu(gate) * up into act
  // (an expert, a block of columns) per work item, its rows in blocks of 32 inside: the weight block stays in
  // cache while the rows stream past it
  at::parallel_for(0, num_active * nb_i, 1, [&](int64_t begin, int64_t end) {
    float gate[kBlockM * kBlockN], up[kBlockM * kBlockN];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = active[i / nb_i], b = i % nb_i;
      const bf16* wg = b13 + (e * nb13 + b) * H * kBlockN;
      const bf16* wu = b13 + (e * nb13 + b + nb_i) * H * kBlockN;
      for (int64_t row0 = off[e]; row0 < off[e + 1]; row0 += kBlockM) {
        const int64_t rows = std::min(kBlockM, off[e + 1] - row0);
        at::native::cpublas::brgemm(rows, kBlockN, H, H, kBlockN, kBlockN, false, x + row0 * H, wg, gate);
        at::native::cpublas::brgemm(rows, kBlockN, H, H, kBlockN, kBlockN, false, x + row0 * H, wu, up);
        for (int64_t r = 0; r < rows; ++r) {
          bf16* dst = a + (row0 + r) * I + b * kBlockN;
          for (int64_t c = 0; c < kBlockN; ++c) dst[c] = bf16(silu(gate[r * kBlockN + c]) * up[r * kBlockN + c]);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  // down: block b of the outputs, times the pair's routing weight
  at::parallel_for(0, num_active * nb_h, 1, [&](int64_t begin, int64_t end) {
    float acc[kBlockM * kBlockN];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = active[i / nb_h], b = i % nb_h;
      const bf16* w = b2 + (e * nb_h + b) * I * kBlockN;
      for (int64_t row0 = off[e]; row0 < off[e + 1]; row0 += kBlockM) {
        const int64_t rows = std::min(kBlockM, off[e + 1] - row0);
        at::native::cpublas::brgemm(rows, kBlockN, I, I, kBlockN, kBlockN, false, a + row0 * I, w, acc);
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = out + (row0 + r) * H + b * kBlockN;
          const float wr = pw[row0 + r];
          for (int64_t c = 0; c < kBlockN; ++c) dst[c] = acc[r * kBlockN + c] * wr;
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return y;
}

// x [T, H] bf16 rows, weights [T, k] float32 routing weights, slots [T * k] int64 (each pair's local expert;
// num_local: served elsewhere) -> (xs [P, H] the served pairs' rows grouped by expert, offsets [num_local + 1]
// where each expert's pairs start, pair_weights [P], pair_of [T, k] each pair's row in xs or -1): a stable
// counting sort, the order argsort(slots, stable=True) gives, and the gathers after it in one pass
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sort_pairs(const at::Tensor& x, const at::Tensor& weights,
                                                                      const at::Tensor& slots, int64_t num_local) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: [T, H] bfloat16 rows");
  TORCH_CHECK(weights.dim() == 2 && weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
                  weights.size(0) == x.size(0), "weights: [T, k] float32");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == weights.numel(),
              "slots: [T * k] int64");
  const int64_t T = x.size(0), H = x.size(1), K = weights.size(1), N = T * K;
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  std::vector<int64_t> start(num_local + 1, 0);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] <= num_local, "slot out of range");
    if (slot[i] < num_local) ++start[slot[i] + 1];
  }
  for (int64_t e = 0; e < num_local; ++e) start[e + 1] += start[e];
  const int64_t P = start[num_local];
  at::Tensor offsets = at::empty({num_local + 1}, slots.options());
  std::copy(start.begin(), start.end(), offsets.mutable_data_ptr<int64_t>());
  at::Tensor pair_of = at::empty({T, K}, slots.options());
  at::Tensor xs = at::empty({P, H}, x.options());
  at::Tensor pw = at::empty({P}, weights.options());
  int64_t* row_of = pair_of.mutable_data_ptr<int64_t>();
  const float* w = weights.const_data_ptr<float>();
  float* pwp = pw.mutable_data_ptr<float>();
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t p = slot[i] < num_local ? next[slot[i]]++ : -1;
    row_of[i] = p;
    if (p >= 0) pwp[p] = w[i];
  }
  const bf16* src = x.const_data_ptr<bf16>();
  bf16* dst = xs.mutable_data_ptr<bf16>();
  const int64_t xstride = x.stride(0);
  at::parallel_for(0, N, moeserve_kernels::row_grain(H * 2), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (row_of[i] >= 0) std::copy(src + (i / K) * xstride, src + (i / K) * xstride + H, dst + row_of[i] * H);
    }
  });
  return {xs, offsets, pw, pair_of};
}

// pairs [P, H] float32, pair_of [T, k] int64 (the row of each token's k-th pair, -1: not here) -> [T, H] in
// dtype of like: each token's pairs summed in its top-k order
at::Tensor sum_pairs(const at::Tensor& pairs, const at::Tensor& pair_of, const at::Tensor& like) {
  TORCH_CHECK(pairs.scalar_type() == at::kFloat && pairs.is_contiguous(), "pairs: float32");
  TORCH_CHECK(pair_of.scalar_type() == at::kLong && pair_of.is_contiguous(), "pair_of: int64");
  const int64_t T = pair_of.size(0), K = pair_of.size(1), H = pairs.size(1);
  at::Tensor out = at::empty({T, H}, like.options());
  TORCH_CHECK(out.scalar_type() == at::kBFloat16, "sum_pairs: bfloat16 output");
  const float* src = pairs.const_data_ptr<float>();
  const int64_t* idx = pair_of.const_data_ptr<int64_t>();
  bf16* dst = out.mutable_data_ptr<bf16>();
  at::parallel_for(0, T, moeserve_kernels::row_grain(H * 4 * K), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(H);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = idx[t * K + k];
        if (p < 0) continue;
        const float* row = src + p * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += row[h];
      }
      for (int64_t h = 0; h < H; ++h) dst[t * H + h] = bf16(acc[h]);
    }
  });
  return out;
}

bool amx_tiles() { return at::native::cpublas::could_pack(at::kBFloat16); }

}  // namespace

TORCH_LIBRARY(moeserve_cpu, m) {
  m.def("amx_tiles() -> bool");
  m.def("pack_experts(Tensor w) -> Tensor");
  m.def("expert_pairs(Tensor xs, Tensor offsets, Tensor w13, Tensor w2, Tensor pair_weights) -> Tensor");
  m.def("sum_pairs(Tensor pairs, Tensor pair_of, Tensor like) -> Tensor");
  m.def("sort_pairs(Tensor x, Tensor weights, Tensor slots, int num_local) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moeserve_cpu, CPU, m) {
  m.impl("pack_experts", pack_experts);
  m.impl("expert_pairs", expert_pairs);
  m.impl("sum_pairs", sum_pairs);
  m.impl("sort_pairs", sort_pairs);
}

TORCH_LIBRARY_IMPL(moeserve_cpu, CompositeExplicitAutograd, m) { m.impl("amx_tiles", amx_tiles); }
