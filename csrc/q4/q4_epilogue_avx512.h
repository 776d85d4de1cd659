// The W4A8 epilogue (q4_gemm.h, "epilogue") on 16 columns of one row, shared by
// the AVX-512 and AMX kernels: both end with a row's float group accumulation
// for one panel in a zmm. Internal linkage: included only by TUs built with
// AVX-512 flags.
#pragma once

#include <immintrin.h>

#include "common/vec_math_avx512.h"
#include "q4/q4_gemm.h"

namespace pycompress {
namespace q4 {
namespace {

// The column operands of panel columns [c, c + 16) (c + 16 may pass N: masked),
// loaded once and applied to each row's float accumulators.
struct PanelEpilogue {
  const Tile& t;
  int64_t c;
  __mmask16 mask;
  __m512 corr, bias;

  PanelEpilogue(const Tile& tile, int64_t col)
      : t(tile),
        c(col),
        mask(tail_mask16(tile.n0 + tile.ncols - col)),
        corr(_mm512_loadu_ps(tile.corr + col)),  // padded to Np
        bias(tile.bias != nullptr ? _mm512_maskz_loadu_ps(mask, tile.bias + col) : _mm512_setzero_ps()) {}

  // Row `row` of the tile (its y, row_scale and row_zp start at row 0).
  void store(int64_t row, __m512 facc) const {
    __m512 y = _mm512_sub_ps(facc, _mm512_mul_ps(_mm512_set1_ps(static_cast<float>(t.row_zp[row])), corr));
    y = _mm512_mul_ps(y, _mm512_set1_ps(t.row_scale[row]));
    if (t.bias != nullptr) y = _mm512_add_ps(y, bias);
    y = apply_activation_avx512(y, t.act);
    _mm512_mask_storeu_ps(t.y + row * t.ldy + c, mask, y);
  }
};

}  // namespace
}  // namespace q4
}  // namespace pycompress
