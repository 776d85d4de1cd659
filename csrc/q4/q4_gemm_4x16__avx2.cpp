// AVX2 path of the W4A8 GEMM: q4_gemm_ymm.h's kernel on vpmaddubsw, exact for
// 4-bit weights with u8 activations (8-bit weights need the slower vpmaddwd
// path there). Up to 4 rows x 16 columns.
#include "q4/q4_gemm_ymm.h"

namespace pycompress {
namespace q4 {
namespace {

struct MaddDot {
  static constexpr int kRows = 4;
  static constexpr bool kSplitRow = false;
  static __m256i step2(__m256i acc, __m256i alo, __m256i wlo, __m256i ahi, __m256i whi) {
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(alo, wlo), _mm256_maddubs_epi16(ahi, whi));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

void gemm_tile_avx2(const Tile& t) { ymm_gemm_tile<MaddDot>(t); }

}  // namespace

const Kernels& kernels_avx2() {
  static const Kernels k{gemm_tile_avx2};
  return k;
}

}  // namespace q4
}  // namespace pycompress
