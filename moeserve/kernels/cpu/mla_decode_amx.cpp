// MLA's absorbed decode attention on AMX tiles: the path mla_decode.cpp takes where the compiler had AMX
// (-march=native on a CPU with amx_tile and amx_bf16) and the shapes fit (mla_decode_amx.h says which).
//
// Per sequence, all its heads at once (up to 16):
// 1. Scores, 16 context rows at a time: a tile of 16 cache rows (read in place: 16 rows of one block are
//    contiguous) times the query's 32-value slices laid out for the tile unit (pairs of values per head),
//    accumulated in float32 over the row's width; two row tiles share each query tile.
// 2. An exact softmax per head over the whole context in float32, the probabilities rounded to bf16 (as the
//    eager path rounds them) into a [heads, context] matrix padded with zeros to 32 columns.
// 3. The weighted sum, 64 latent columns at a time: four accumulator tiles of [heads, 16] float32, the
//    probabilities' tile times the rows' latent part, interleaved in pairs of rows for the tile unit (rows
//    past the context are zeros, never read).
// The tile unit does 16 x 16 x 32 multiply-adds an instruction, where the AVX-512 path does 16 x 2 per
// dpbf16: that path was bound by its arithmetic (BENCHMARKS.md, issue 26).

#include "mla_decode_amx.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MOESERVE_AMX 1
#endif

namespace moeserve_kernels {

#ifdef MOESERVE_AMX
namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kRows = 16;  // context rows per score tile
constexpr int64_t kPair = 32;  // context rows per weighted-sum step (16 pairs)
constexpr int64_t kCols = 64;  // latent columns per weighted-sum pass (four 16-column tiles)

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  void set(int tile, int64_t num_rows, int64_t bytes_per_row) {
    rows[tile] = static_cast<uint8_t>(num_rows);
    colsb[tile] = static_cast<uint16_t>(bytes_per_row);
  }
};

// Linux hands out the tile state only to processes that ask for it (once, for all threads)
bool tiles_permitted() {
  static const bool ok = [] {
    constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return ok;
}

struct Scratch {
  std::vector<uint32_t> query;  // [D / 2, nh]: the query's value pairs, head by head
  std::vector<float> scores;    // [groups * 16, nh]: the score tiles as stored
  std::vector<bf16> probs;      // [nh, padded]: the rounded probabilities, zeros past the context
  std::vector<float> acc;       // [nh, kv_lora]
  std::vector<const bf16*> rows;
  alignas(64) uint32_t pairs[4][16][16];  // the weighted sum's four B tiles: 16 row pairs x 16 columns
};

// B tiles for columns c0..c0+63 of rows r0 and r0+1 (r1 may be null: zeros), row pair k of each tile
inline void interleave_pair(const bf16* r0, const bf16* r1, int64_t c0, int64_t k, Scratch& w) {
  alignas(64) static const uint16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  for (int half = 0; half < 2; ++half) {
    const __m512i a = _mm512_loadu_si512(r0 + c0 + 32 * half);
    const __m512i b = r1 != nullptr ? _mm512_loadu_si512(r1 + c0 + 32 * half) : _mm512_setzero_si512();
    _mm512_store_si512(w.pairs[2 * half][k], _mm512_permutex2var_epi16(a, low, b));
    _mm512_store_si512(w.pairs[2 * half + 1][k], _mm512_permutex2var_epi16(a, high, b));
  }
}

void decode_sequence(const bf16* q, int64_t nh, int64_t D, int64_t L, int64_t row_stride, int64_t kv_lora,
                     float scale, Scratch& w, bf16* out) {
  if (L == 0) {
    std::fill(out, out + nh * kv_lora, bf16(0.0f));
    return;
  }
  const int64_t groups = (L + kRows - 1) / kRows, padded = (L + kPair - 1) / kPair * kPair;
  const int64_t half_d = D / 2;
  w.query.resize(half_d * nh);
  w.scores.resize(groups * kRows * nh);
  w.probs.resize(nh * padded);
  w.acc.resize(nh * kv_lora);
  const uint32_t* q32 = reinterpret_cast<const uint32_t*>(q);
  for (int64_t h = 0; h < nh; ++h) {
    for (int64_t p = 0; p < half_d; ++p) w.query[p * nh + h] = q32[h * half_d + p];
  }

  // 1. scores: tiles 0, 1 accumulate [16 rows, nh]; 2, 3 the rows; 4 the query's slice
  TileConfig score_tiles;
  score_tiles.set(0, kRows, 4 * nh);
  score_tiles.set(1, kRows, 4 * nh);
  score_tiles.set(2, kRows, 64);
  score_tiles.set(3, kRows, 64);
  score_tiles.set(4, 16, 4 * nh);
  _tile_loadconfig(&score_tiles);
  const int64_t stride = row_stride * static_cast<int64_t>(sizeof(bf16)), steps = D / 32;
  float* sc = w.scores.data();
  int64_t g = 0;
  for (; g + 1 < groups; g += 2) {
    const bf16* a0 = w.rows[g * kRows];
    const bf16* a1 = w.rows[(g + 1) * kRows];
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t t = 0; t < steps; ++t) {
      _tile_loadd(4, w.query.data() + t * 16 * nh, 4 * nh);
      _tile_loadd(2, a0 + 32 * t, stride);
      _tile_loadd(3, a1 + 32 * t, stride);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(1, 3, 4);
    }
    _tile_stored(0, sc + g * kRows * nh, 4 * nh);
    _tile_stored(1, sc + (g + 1) * kRows * nh, 4 * nh);
  }
  if (g < groups) {
    const bf16* a0 = w.rows[g * kRows];
    _tile_zero(0);
    for (int64_t t = 0; t < steps; ++t) {
      _tile_loadd(4, w.query.data() + t * 16 * nh, 4 * nh);
      _tile_loadd(2, a0 + 32 * t, stride);
      _tile_dpbf16ps(0, 2, 4);
    }
    _tile_stored(0, sc + g * kRows * nh, 4 * nh);
  }

  // 2. softmax per head (rows past the context were scored from whatever the block holds: never read)
  for (int64_t h = 0; h < nh; ++h) {
    float m = -1e30f;  // finite: -ffast-math assumes no infinities
    for (int64_t j = 0; j < L; ++j) m = std::max(m, sc[j * nh + h] * scale);
    float sum = 0.0f;
    for (int64_t j = 0; j < L; ++j) {
      const float e = std::exp(sc[j * nh + h] * scale - m);
      sc[j * nh + h] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
    bf16* ph = w.probs.data() + h * padded;
    for (int64_t j = 0; j < L; ++j) ph[j] = bf16(sc[j * nh + h] * inv);
    std::fill(ph + L, ph + padded, bf16(0.0f));
  }

  // 3. weighted sum: tiles 0-3 accumulate [nh, 16] each, 4 the probabilities [nh, 32], 5-7 the row pairs
  TileConfig sum_tiles;
  for (int t = 0; t < 4; ++t) sum_tiles.set(t, nh, 64);
  sum_tiles.set(4, nh, 64);
  for (int t = 5; t < 8; ++t) sum_tiles.set(t, 16, 64);
  _tile_loadconfig(&sum_tiles);
  const int64_t prob_stride = padded * static_cast<int64_t>(sizeof(bf16));
  for (int64_t c0 = 0; c0 < kv_lora; c0 += kCols) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t j0 = 0; j0 < padded; j0 += kPair) {
      for (int64_t k = 0; k < kPair / 2; ++k) {
        const int64_t j = j0 + 2 * k;
        if (j < L) {
          interleave_pair(w.rows[j], j + 1 < L ? w.rows[j + 1] : nullptr, c0, k, w);
        } else {
          for (auto& tile : w.pairs) std::fill(tile[k], tile[k] + 16, 0u);
        }
      }
      _tile_loadd(4, w.probs.data() + j0, prob_stride);
      _tile_loadd(5, w.pairs[0], 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, w.pairs[1], 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, w.pairs[2], 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, w.pairs[3], 64);
      _tile_dpbf16ps(3, 4, 5);
    }
    float* acc = w.acc.data() + c0;
    const int64_t acc_stride = kv_lora * static_cast<int64_t>(sizeof(float));
    _tile_stored(0, acc, acc_stride);
    _tile_stored(1, acc + 16, acc_stride);
    _tile_stored(2, acc + 32, acc_stride);
    _tile_stored(3, acc + 48, acc_stride);
  }
  for (int64_t i = 0; i < nh * kv_lora; ++i) out[i] = bf16(w.acc[i]);
}

}  // namespace

bool mla_decode_amx_fits(int64_t heads, int64_t dim, int64_t kv_lora, int64_t block_size) {
  return heads <= 16 && dim % 32 == 0 && kv_lora % kCols == 0 && kv_lora <= dim && block_size % kRows == 0 &&
         tiles_permitted();
}

void mla_decode_amx(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables, const at::Tensor& lens,
                    int64_t block_size, int64_t kv_lora, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), nb = tables.size(1), row_stride = cache.stride(0);
  const bf16* qp = q.const_data_ptr<bf16>();
  const bf16* cp = cache.const_data_ptr<bf16>();
  const int64_t* tp = tables.const_data_ptr<int64_t>();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  bf16* op = out.mutable_data_ptr<bf16>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    // NOTE: PyTorch's own micro-kernel calls keep the tile configuration they set last per thread; forgetting
    // it here makes the next of them set it again after this kernel changed it
    at::native::cpublas::brgemm_release();
    Scratch w;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lp[b];
      w.rows.resize(L);
      for (int64_t pos = 0; pos < L; ++pos) {
        w.rows[pos] = cp + (tp[b * nb + pos / block_size] * block_size + pos % block_size) * row_stride;
      }
      decode_sequence(qp + b * H * D, H, D, L, row_stride, kv_lora, static_cast<float>(scale), w,
                      op + b * H * kv_lora);
    }
    _tile_release();
  });
}

bool mla_decode_amx_built() { return tiles_permitted(); }

#else

bool mla_decode_amx_fits(int64_t, int64_t, int64_t, int64_t) { return false; }

void mla_decode_amx(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                    double, at::Tensor&) {
  TORCH_CHECK(false, "mla_decode_amx: built without AMX");
}

bool mla_decode_amx_built() { return false; }

#endif

}  // namespace moeserve_kernels
