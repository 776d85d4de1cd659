// AVX2 pieces shared by the sparse cols kernels (sparse_cols_32x1__avx2.cpp,
// sparse_cols_panels_32x1__avx2.cpp): the 8 x 8 register transpose and the
// fp32 and int8 epilogues of 8 channels x 8 rows stored as one contiguous
// masked row piece per row. Internal linkage: included from translation
// units with different ISA flags (csrc/README.md), and only from AVX2 ones.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "common/vec_math_avx2.h"
#include "sparse/sparse.h"

namespace pycompress {
namespace sparse {
namespace {

inline void transpose8x8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 2; ++i) {
    for (int h = 0; h < 2; ++h) {
      const __m256 a = t[4 * i + h], b = t[4 * i + 2 + h];
      u[4 * i + 2 * h] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * i + 2 * h + 1] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2));
    }
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

inline __m256i lanes_mask(int64_t valid) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(valid)), index);
}

// Epilogue of `channels` (<= 8) consecutive output channels from n0 for the 8
// rows from row0 (col(c): channel c's 8 row sums): transposed in registers so
// y gets one contiguous masked store per row and bias is one vector load (a
// store per channel and row into a y whose row stride is a power of two hits
// one L1 set; see the AVX-512 file).
template <typename Col>
inline void f32_store_tile8(const F32Task& t, int64_t n0, int64_t channels, int64_t row0, Col col) {
  __m256 r[8];
  for (int c = 0; c < 8; ++c) r[c] = c < channels ? _mm256_load_ps(col(c)) : _mm256_setzero_ps();
  transpose8x8(r);
  const __m256i lanes = lanes_mask(channels);
  const __m256 bias = t.bias != nullptr ? _mm256_maskload_ps(t.bias + n0, lanes) : _mm256_setzero_ps();
  const int64_t rows = t.m - row0 < 8 ? t.m - row0 : 8;
  for (int64_t i = 0; i < rows; ++i) {
    __m256 y = r[i];
    if (t.bias != nullptr) y = _mm256_add_ps(y, bias);
    y = apply_activation_avx2(y, t.act);
    _mm256_maskstore_ps(t.y + (row0 + i) * t.ldy + n0, lanes, y);
  }
}

// int8 twin of f32_store_tile8: the 8 rows from row0 of `channels` (<= 8)
// channels from n0 (col(c): channel c's 8 int32 row sums), transposed in
// registers; per lane the same IEEE operations as q8_epilogue, then one masked
// store per row (or the raw sums, for the test hook).
template <typename Col>
inline void q8_store_tile8(const Q8Task& t, int64_t n0, int64_t channels, int64_t row0, Col col) {
  __m256 r[8];
  for (int c = 0; c < 8; ++c) r[c] = c < channels ? _mm256_load_ps(col(c)) : _mm256_setzero_ps();
  transpose8x8(r);
  const __m256i lanes = lanes_mask(channels);
  const int64_t rows = t.m - row0 < 8 ? t.m - row0 : 8;
  if (t.raw != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      _mm256_maskstore_epi32(t.raw + (row0 + i) * t.ldraw + n0, lanes, _mm256_castps_si256(r[i]));
    }
    return;
  }
  const __m256i col_sum = _mm256_maskload_epi32(t.w->col_sum + n0, lanes);
  const __m256 w_scale = _mm256_maskload_ps(t.w->w_scale + n0, lanes);
  const __m256 bias = t.bias != nullptr ? _mm256_maskload_ps(t.bias + n0, lanes) : _mm256_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = row0 + i;
    const __m256i corrected =
        _mm256_sub_epi32(_mm256_castps_si256(r[i]), _mm256_mullo_epi32(_mm256_set1_epi32(t.row_zp[row]), col_sum));
    __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(corrected), _mm256_mul_ps(_mm256_set1_ps(t.row_scale[row]), w_scale));
    if (t.bias != nullptr) y = _mm256_add_ps(y, bias);
    y = apply_activation_avx2(y, t.act);
    _mm256_maskstore_ps(t.y + row * t.ldy + n0, lanes, y);
  }
}

}  // namespace
}  // namespace sparse
}  // namespace pycompress
