// AVX-512 VNNI int8 rows (gather) kernel of the sparse linears (sparse.h),
// tile up to 3 rows x 1 output channel: 16 1x4 blocks per vpgatherdd (uint16
// indices widened once per 16), two accumulator sets per row so the
// dot-product latency chain never limits a single-row (decode) call. The fp32
// rows kernel of this level is the AVX2 one (sparse_dispatch.cpp).
#include <immintrin.h>

#include "sparse/sparse_avx512.h"
#include "sparse/sparse_epilogue.h"
#include "sparse/sparse_kernels.h"

namespace pycompress {
namespace sparse {
namespace {

template <int MR>
void q8_rows_mr(const Q8Task& t, int64_t r0) {
  const Q8Weights& w = *t.w;
  for (int64_t n = t.n0; n < t.n1; ++n) {
    __m512i acc[MR][2];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    const int64_t b1 = w.row_ptr[n + 1];
    int s = 0;
    for (int64_t b = w.row_ptr[n]; b < b1; b += 16, s ^= 1) {
      const __mmask16 mask = tail_mask16(b1 - b);
      const __m512i idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, w.blk_idx + b));
      const __m512i wv = _mm512_maskz_loadu_epi32(mask, w.values + 4 * b);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m512i xv =
            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, idx, t.xq + (r0 + r) * w.kp, 4);
        acc[r][s] = _mm512_dpbusd_epi32(acc[r][s], xv, wv);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      q8_store_scalar(t, r0 + r, n, _mm512_reduce_add_epi32(_mm512_add_epi32(acc[r][0], acc[r][1])));
    }
  }
}

}  // namespace

void q8_rows_avx512(const Q8Task& t) {
  int64_t r = 0;
  for (; r + 3 <= t.m; r += 3) q8_rows_mr<3>(t, r);
  switch (t.m - r) {
    case 2: return q8_rows_mr<2>(t, r);
    case 1: return q8_rows_mr<1>(t, r);
    default: return;
  }
}

}  // namespace sparse
}  // namespace pycompress
