// The int8 GEMM tile epilogue on ymm registers (8 output channels a vector),
// shared by the AVX2 and AVX-VNNI kernels: raw accumulators, or the contract's
// dequantize / bias / activation (q8_gemm.h), one IEEE float32 operation a
// step in the scalar spec's order. Internal linkage: included by translation
// units compiled with different ISA flags.
#pragma once

#include <immintrin.h>

#include "common/vec_math_avx2.h"
#include "q8/q8_gemm.h"

namespace pycompress {
namespace q8 {
namespace {

alignas(32) constexpr int32_t kLaneIndex8[8] = {0, 1, 2, 3, 4, 5, 6, 7};

// Lanes [0, valid) set (valid clamped to [0, 8]).
inline __m256i tail_mask8(int64_t valid) {
  const int32_t v = valid >= 8 ? 8 : static_cast<int32_t>(valid < 0 ? 0 : valid);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(v), _mm256_load_si256(reinterpret_cast<const __m256i*>(kLaneIndex8)));
}

// The column operands of output channels [n, n + 8), loaded once for every row of a tile.
struct Columns8 {
  int64_t n;
  __m256i mask;
  __m256i colsum;
  __m256 wscale;
  __m256 bias;
};

inline Columns8 load_columns8(const GemmTile& t, int64_t n) {
  Columns8 c;
  c.n = n;
  c.mask = tail_mask8(t.n0 + t.ncols - n);
  if (t.raw != nullptr) return c;
  c.colsum = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.col_sum + n));  // padded to Np
  c.wscale = _mm256_maskload_ps(t.w_scale + n, c.mask);
  c.bias = t.bias != nullptr ? _mm256_maskload_ps(t.bias + n, c.mask) : _mm256_setzero_ps();
  return c;
}

// Row `r` of the tile, channels c.n..c.n+7: `sum` holds their int32 accumulators.
inline void store_row8(const GemmTile& t, const Columns8& c, int64_t r, __m256i sum) {
  if (t.raw != nullptr) {
    _mm256_maskstore_epi32(t.raw + r * t.ldraw + c.n, c.mask, sum);
    return;
  }
  const __m256i corrected = _mm256_sub_epi32(sum, _mm256_mullo_epi32(_mm256_set1_epi32(t.row_zp[r]), c.colsum));
  __m256 y = _mm256_cvtepi32_ps(corrected);
  y = _mm256_mul_ps(y, _mm256_mul_ps(_mm256_set1_ps(t.row_scale[r]), c.wscale));
  if (t.bias != nullptr) y = _mm256_add_ps(y, c.bias);
  y = apply_activation_avx2(y, t.act);
  _mm256_maskstore_ps(t.y + r * t.ldy + c.n, c.mask, y);
}

}  // namespace
}  // namespace q8
}  // namespace pycompress
