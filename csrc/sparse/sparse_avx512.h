// AVX-512 pieces shared by the sparse kernels of sparse_spmm__avx512vnni.cpp
// and sparse_sliced_bytes__avx512vbmi.cpp: the tail mask, the int8 epilogue of
// one row of 16 channels, and the skeleton of the sliced kernels (the
// slice/row blocking and the accumulator sets; each layout supplies only its
// step: vpermd for the group layout, vpermb for the byte layout).
// Internal linkage: included from translation units with different ISA flags
// (csrc/README.md), and only from AVX-512 ones.
#pragma once

#include <immintrin.h>

#include <type_traits>

#include "common/vec_math_avx512.h"
#include "sparse/sparse.h"

namespace pycompress {
namespace sparse {
namespace {

inline __mmask16 tail_mask(int64_t valid) {
  return valid >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1u);
}

// Row `row` of an int8 task (Q8Task or SlicedTask): 16 channels' int32 sums
// to floats, per lane the same IEEE operations as q8_epilogue
// (sparse_epilogue.h); col_sum, w_scale and bias are the 16 channels' values.
template <class Task>
inline __m512 q8_epilogue_avx512(const Task& t, int64_t row, __m512i acc, __m512i col_sum, __m512 w_scale,
                                 __m512 bias) {
  const __m512i corrected = _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(t.row_zp[row]), col_sum));
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(corrected), _mm512_mul_ps(_mm512_set1_ps(t.row_scale[row]), w_scale));
  if (t.bias != nullptr) y = _mm512_add_ps(y, bias);
  return apply_activation_avx512(y, t.act);
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
  const __mmask16 lanes = tail_mask(w.n - n0);
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
    _mm512_mask_storeu_ps(t.y + row * t.ldy + n0, lanes, q8_epilogue_avx512(t, row, acc[0][r], col_sum, w_scale, bias));
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
