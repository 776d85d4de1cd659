// AVX-512 VBMI + VNNI kernel of the sliced byte layout (sparse.h), tile up to
// 4 rows x 16 output channels (one slice; sparse_avx512.h sliced_blocks /
// sliced_rows): per step one weight zmm and one position zmm (64 slots: 16
// channel lanes x 4 nonzeros), and per row one unaligned 64-byte window load,
// one vpermb that puts every slot's activation byte in place, one vpdpbusd.
// Its own translation unit: vpermb needs VBMI, which the AVX-512 VNNI level
// does not assume (Cascade Lake has VNNI without VBMI): the avx512vbmi level's
// table is the AVX-512 VNNI one with this kernel for the byte layout
// (sparse_dispatch.cpp).
#include <immintrin.h>

#include "sparse/sparse_avx512.h"
#include "sparse/sparse_kernels.h"

namespace pycompress {
namespace sparse {

void q8_sliced_bytes_avx512vbmi(const SlicedTask& t) {
  const SlicedWeights& w = *t.w;
  sliced_blocks(t, [&](auto mr, int64_t s, int64_t r0) {
    constexpr int MR = decltype(mr)::value;
    sliced_rows<MR>(t, s, r0, [&](__m512i* acc, int64_t j) {
      const __m512i wv = _mm512_loadu_si512(w.values + 64 * j);
      const __m512i pos = _mm512_loadu_si512(w.step_pos + 64 * j);
      const uint8_t* xw = t.xq + static_cast<int64_t>(w.step_base[j]) + r0 * t.ldq;
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512i xv = _mm512_permutexvar_epi8(pos, _mm512_loadu_si512(xw + r * t.ldq));
        acc[r] = _mm512_dpbusd_epi32(acc[r], xv, wv);
      }
    });
  });
}

}  // namespace sparse
}  // namespace pycompress
