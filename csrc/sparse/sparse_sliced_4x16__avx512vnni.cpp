// AVX-512 VNNI kernel of the sliced (group) layout (sparse.h), tile up to 4
// rows x 16 output channels (one slice; sparse_avx512.h sliced_blocks /
// sliced_rows): per step one weight zmm (16 channels x one 1x4 block), the 16
// window offsets unpacked by a qword broadcast + vpsrlvd, and per row one
// unaligned 64-byte window load, one vpermd, one vpdpbusd.
#include <immintrin.h>

#include <cstring>

#include "common/vec_math_avx512.h"
#include "sparse/sparse_avx512.h"
#include "sparse/sparse_kernels.h"

namespace pycompress {
namespace sparse {

void q8_sliced_avx512(const SlicedTask& t) {
  const SlicedWeights& w = *t.w;
  const __m512i shifts = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  sliced_blocks(t, [&](auto mr, int64_t s, int64_t r0) {
    constexpr int MR = decltype(mr)::value;
    sliced_rows<MR>(t, s, r0, [&](__m512i* acc, int64_t j) {
      const __m512i wv = _mm512_loadu_si512(w.values + 64 * j);
      int64_t lanes;
      std::memcpy(&lanes, w.step_lane + 2 * j, sizeof lanes);
      const __m512i idx = _mm512_srlv_epi32(_mm512_set1_epi64(lanes), shifts);
      const uint8_t* xw = t.xq + 4 * static_cast<int64_t>(w.step_base[j]) + r0 * t.ldq;
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512i xv = _mm512_permutexvar_epi32(idx, _mm512_loadu_si512(xw + r * t.ldq));
        acc[r] = _mm512_dpbusd_epi32(acc[r], xv, wv);
      }
    });
  });
}

}  // namespace sparse
}  // namespace pycompress
