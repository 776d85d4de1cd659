// The int8 GEMM epilogue on 16 columns of one row (q8_gemm.h, "epilogue"), shared
// by the AVX-512 and AMX kernels (both hold a row's accumulators for one panel
// in a zmm at the end) and the sparse int8 AVX-512 kernels. Internal linkage: included only by TUs built with
// AVX-512 flags.
#pragma once

#include <immintrin.h>

#include "common/vec_math_avx512.h"
#include "q8/q8_gemm.h"

namespace pycompress {
namespace q8 {
namespace {

// The contract's epilogue of one row on 16 channels' int32 sums: `t` is any
// tile or task with row_zp, row_scale, bias and act (the sparse int8 kernels'
// too); col_sum, w_scale and bias are the 16 channels' values.
template <class Rows>
inline __m512 epilogue_avx512(const Rows& t, int64_t row, __m512i acc, __m512i col_sum, __m512 w_scale,
                              __m512 bias) {
  const __m512i corrected = _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(t.row_zp[row]), col_sum));
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(corrected), _mm512_mul_ps(_mm512_set1_ps(t.row_scale[row]), w_scale));
  if (t.bias != nullptr) y = _mm512_add_ps(y, bias);
  return apply_activation_avx512(y, t.act);
}

// The column operands of panel columns [n, n + 16) (n + 16 may pass N: masked),
// loaded once and applied to each row's accumulators.
struct PanelEpilogue {
  const GemmTile& t;
  int64_t n;
  __mmask16 mask;
  __m512i colsum;
  __m512 wscale, bias;

  PanelEpilogue(const GemmTile& tile, int64_t col)
      : t(tile), n(col), mask(tail_mask16(tile.n0 + tile.ncols - col)) {
    if (t.raw != nullptr) return;
    colsum = _mm512_loadu_si512(t.col_sum + n);  // padded to Np
    wscale = _mm512_maskz_loadu_ps(mask, t.w_scale + n);
    bias = t.bias != nullptr ? _mm512_maskz_loadu_ps(mask, t.bias + n) : _mm512_setzero_ps();
  }

  // Row r of the tile (its y, raw, row_scale and row_zp start at row 0).
  void store(int64_t r, __m512i acc) const {
    if (t.raw != nullptr) {
      _mm512_mask_storeu_epi32(t.raw + r * t.ldraw + n, mask, acc);
      return;
    }
    _mm512_mask_storeu_ps(t.y + r * t.ldy + n, mask, epilogue_avx512(t, r, acc, colsum, wscale, bias));
  }
};

}  // namespace
}  // namespace q8
}  // namespace pycompress
