// AVX2 kernel of the sliced (group) layout (sparse.h), tile 1 row x 16
// output channels (one slice). No vpermb below AVX-512 VBMI: the byte layout
// runs the scalar spec on this level (SparseInt8Linear never picks it here).
#include <immintrin.h>

#include <cstring>

#include "sparse/sparse_epilogue.h"
#include "sparse/sparse_kernels.h"

namespace pycompress {
namespace sparse {

// Sliced layout (sparse.h) in two halves of 8 lanes: the 16-group window is
// two ymm, vpermd picks within each and the offset's bit 3 selects between
// them (blendv on the offset shifted into the sign bit). The dot product is
// vpmaddwd on zero-extended bytes (no saturation), pairs folded at the end.
void q8_sliced_avx2(const SlicedTask& t) {
  const SlicedWeights& w = *t.w;
  const __m256i shifts[2] = {_mm256_set_epi32(12, 12, 8, 8, 4, 4, 0, 0), _mm256_set_epi32(28, 28, 24, 24, 20, 20, 16, 16)};
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int64_t s = t.s0; s < t.s1; ++s) {
    const int64_t n0 = s * kSliceLanes;
    for (int64_t r = 0; r < t.m; ++r) {
      const uint8_t* xq = t.xq + r * t.ldq;
      __m256i acc[2][2] = {{_mm256_setzero_si256(), _mm256_setzero_si256()},
                           {_mm256_setzero_si256(), _mm256_setzero_si256()}};
      for (int64_t j = w.slice_ptr[s]; j < w.slice_ptr[s + 1]; ++j) {
        int64_t lanes;
        std::memcpy(&lanes, w.step_lane + 2 * j, sizeof lanes);
        const __m256i all = _mm256_set1_epi64x(lanes);
        const uint8_t* xw = xq + 4 * static_cast<int64_t>(w.step_base[j]);
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xw));
        const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xw + 32));
        for (int h = 0; h < 2; ++h) {
          const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(all, shifts[h]), low4);
          const __m256 pick_hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
          const __m256i xv = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(_mm256_permutevar8x32_epi32(lo, idx)),
                                                                  _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(hi, idx)),
                                                                  pick_hi));
          const __m128i* wp = reinterpret_cast<const __m128i*>(w.values + 64 * j + 32 * h);
          acc[h][0] = _mm256_add_epi32(acc[h][0], _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(xv)),
                                                                    _mm256_cvtepi8_epi16(_mm_loadu_si128(wp))));
          acc[h][1] = _mm256_add_epi32(acc[h][1], _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(xv, 1)),
                                                                    _mm256_cvtepi8_epi16(_mm_loadu_si128(wp + 1))));
        }
      }
      alignas(32) int32_t sums[kSliceLanes];
      for (int h = 0; h < 2; ++h) {
        // hadd leaves channels (0 1 4 5 | 2 3 6 7) of the half; qword order 0 2 1 3 restores them.
        const __m256i folded = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[h][0], acc[h][1]), 0xD8);
        _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8 * h), folded);
      }
      for (int64_t l = 0; l < kSliceLanes && n0 + l < w.n; ++l) {
        const int64_t n = n0 + l;
        q8_store_scalar(t, r, n, sums[l]);
      }
    }
  }
}

}  // namespace sparse
}  // namespace pycompress
