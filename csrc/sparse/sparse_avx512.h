// AVX-512 pieces shared by the sparse kernels of the avx512vnni and avx512vbmi
// files (sparse_<op>_<tile>__avx512*.cpp): the 16 x 16 register transpose and the fp32 / int8
// store tiles of the cols kernels, their accumulator sets, and the skeleton of
// the sliced kernels (the slice/row blocking and the accumulator sets; each
// layout supplies only its step: vpermd for the group layout, vpermb for the
// byte layout).
// Internal linkage: included from translation units with different ISA flags
// (csrc/README.md), and only from AVX-512 ones.
#pragma once

#include <immintrin.h>

#include <type_traits>

#include "common/vec_math_avx512.h"
#include "q8/q8_epilogue_avx512.h"
#include "sparse/sparse.h"

namespace pycompress {
namespace sparse {
namespace {

// In-register 16 x 16 transpose: r[i] lane j becomes r[j] lane i.
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: a0 b0 a1 b1 | a2 b2 a3 b3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane L: element 4L + j of rows 4i..4i+3 in r[4i + j]
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  __m512 o[16];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {  // gather lane L of r[j], r[4+j], r[8+j], r[12+j] into row 4L + j
    const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), u3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    o[j] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    o[8 + j] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    o[4 + j] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    o[12 + j] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = o[i];
}

// Epilogue of `channels` (<= 16) consecutive output channels from n0 for the
// 16 rows from row0: col(c) points at channel c's 16 row sums. The tile is
// transposed in registers so y gets one contiguous (masked) row store per
// row, and bias is one vector load: a store per channel and row into a y
// whose row stride is a power of two hits one L1 set and missed on nearly
// every store (K=N=4096, M=16: ~40% of the call).
template <typename Col>
inline void f32_store_tile(const F32Task& t, int64_t n0, int64_t channels, int64_t row0, Col col) {
  __m512 r[16];
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c) r[c] = c < channels ? _mm512_load_ps(col(c)) : _mm512_setzero_ps();
  transpose16x16(r);
  const __mmask16 lanes = tail_mask16(channels);
  const __m512 bias = t.bias != nullptr ? _mm512_maskz_loadu_ps(lanes, t.bias + n0) : _mm512_setzero_ps();
  const int64_t rows = t.m - row0 < 16 ? t.m - row0 : 16;
  for (int64_t i = 0; i < rows; ++i) {
    __m512 y = r[i];
    if (t.bias != nullptr) y = _mm512_add_ps(y, bias);
    y = apply_activation_avx512(y, t.act);
    _mm512_mask_storeu_ps(t.y + (row0 + i) * t.ldy + n0, lanes, y);
  }
}

// Epilogue of `channels` (<= 16) consecutive channels from n0 for the 16 rows
// from row0 (col(c): channel c's 16 int32 row sums), transposed in registers
// so y (or raw) gets one contiguous masked store per row; per lane the same
// IEEE operations as q8_epilogue.
template <typename Col>
inline void q8_store_tile(const Q8Task& t, int64_t n0, int64_t channels, int64_t row0, Col col) {
  __m512 r[16];
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c) r[c] = c < channels ? _mm512_load_ps(col(c)) : _mm512_setzero_ps();
  transpose16x16(r);
  const __mmask16 lanes = tail_mask16(channels);
  const int64_t rows = t.m - row0 < 16 ? t.m - row0 : 16;
  if (t.raw != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      _mm512_mask_storeu_epi32(t.raw + (row0 + i) * t.ldraw + n0, lanes, _mm512_castps_si512(r[i]));
    }
    return;
  }
  const __m512i col_sum = _mm512_maskz_loadu_epi32(lanes, t.w->col_sum + n0);
  const __m512 w_scale = _mm512_maskz_loadu_ps(lanes, t.w->w_scale + n0);
  const __m512 bias = t.bias != nullptr ? _mm512_maskz_loadu_ps(lanes, t.bias + n0) : _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = row0 + i;
    _mm512_mask_storeu_ps(t.y + row * t.ldy + n0, lanes,
                          q8::epilogue_avx512(t, row, _mm512_castps_si512(r[i]), col_sum, w_scale, bias));
  }
}

// Independent accumulator sets so the FMA latency (4 cycles) is covered.
template <int MV>
constexpr int acc_sets() {
  return MV == 1 ? 4 : (MV == 2 ? 2 : 1);
}

// Slice s, rows [r0, r0 + MR): step(acc, j) adds step j to the MR row
// accumulators acc[0..MR); steps rotate over independent accumulator sets so
// the vpdpbusd latency never limits a one- or two-row call. Then the epilogue:
// per lane the same IEEE operations as q8_epilogue (sparse_epilogue.h), one
// contiguous masked store of 16 channels per row.
template <int MR, class Step>
inline void sliced_rows(const SlicedTask& t, int64_t s, int64_t r0, Step&& step) {
  constexpr int S = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  const SlicedWeights& w = *t.w;
  __m512i acc[S][MR];
#pragma GCC unroll 4
  for (int a = 0; a < S; ++a)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[a][r] = _mm512_setzero_si512();
  const int64_t j1 = w.slice_ptr[s + 1];
  int64_t j = w.slice_ptr[s];
  for (; j + S <= j1; j += S) {
#pragma GCC unroll 4
    for (int a = 0; a < S; ++a) step(acc[a], j + a);
  }
  for (int a = 0; j < j1; ++j, ++a) step(acc[a], j);

  const int64_t n0 = s * kSliceLanes;
  const __mmask16 lanes = tail_mask16(w.n - n0);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int a = 1; a < S; ++a) acc[0][r] = _mm512_add_epi32(acc[0][r], acc[a][r]);
  }
  if (t.raw != nullptr) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_epi32(t.raw + (r0 + r) * t.ldraw + n0, lanes, acc[0][r]);
    return;
  }
  const __m512i col_sum = _mm512_maskz_loadu_epi32(lanes, w.col_sum + n0);
  const __m512 w_scale = _mm512_maskz_loadu_ps(lanes, w.w_scale + n0);
  const __m512 bias = t.bias != nullptr ? _mm512_maskz_loadu_ps(lanes, t.bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const int64_t row = r0 + r;
    _mm512_mask_storeu_ps(t.y + row * t.ldy + n0, lanes, q8::epilogue_avx512(t, row, acc[0][r], col_sum, w_scale, bias));
  }
}

// Slices are taken a few at a time and every group of 4 rows runs over all of
// them: the 4 rows' activations stay in L1 while the block's steps come from
// L2, instead of all M rows cycling through L1 per slice (8 rows per group
// measured no better on Zen 4). rows(mr, s, r0) runs slice s for rows
// [r0, r0 + mr) with mr a std::integral_constant<int, MR>, MR <= 4.
constexpr int64_t kSlicesPerBlock = 8;

template <class Rows>
inline void sliced_blocks(const SlicedTask& t, Rows&& rows) {
  for (int64_t sb = t.s0; sb < t.s1; sb += kSlicesPerBlock) {
    const int64_t se = sb + kSlicesPerBlock < t.s1 ? sb + kSlicesPerBlock : t.s1;
    int64_t r = 0;
    for (; r + 4 <= t.m; r += 4)
      for (int64_t s = sb; s < se; ++s) rows(std::integral_constant<int, 4>{}, s, r);
    for (int64_t s = sb; s < se; ++s) {
      switch (t.m - r) {
        case 3: rows(std::integral_constant<int, 3>{}, s, r); break;
        case 2: rows(std::integral_constant<int, 2>{}, s, r); break;
        case 1: rows(std::integral_constant<int, 1>{}, s, r); break;
        default: break;
      }
    }
  }
}

}  // namespace
}  // namespace sparse
}  // namespace pycompress
