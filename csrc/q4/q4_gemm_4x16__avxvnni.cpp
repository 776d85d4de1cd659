// AVX-VNNI path of the W4A8 GEMM: q4_gemm_ymm.h's kernel on ymm vpdpbusd.
// Up to 4 rows x 16 columns.
#include "q4/q4_gemm_ymm.h"

namespace pycompress {
namespace q4 {
namespace {

struct VnniDot {
  static constexpr int kRows = 4;
  static constexpr bool kSplitRow = true;
  static __m256i step(__m256i acc, __m256i a, __m256i w) { return _mm256_dpbusd_avx_epi32(acc, a, w); }
  static __m256i step2(__m256i acc, __m256i alo, __m256i wlo, __m256i ahi, __m256i whi) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, alo, wlo), ahi, whi);
  }
};

void gemm_tile_avxvnni(const Tile& t) { ymm_gemm_tile<VnniDot>(t); }

}  // namespace

const Kernels& kernels_avxvnni() {
  static const Kernels k{gemm_tile_avxvnni};
  return k;
}

}  // namespace q4
}  // namespace pycompress
