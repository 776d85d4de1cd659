// AVX-VNNI path: the VEX-encoded ymm vpdpbusd (u8 x s8 -> s32, 4-wide dot
// products accumulated in int32) of Intel Alder Lake / Sapphire Rapids and
// AMD Zen 5: exact like the AVX-512 VNNI path, at 8 channels a vector, and one
// instruction per 32 multiply-adds where the exact AVX2 path needs a widen, a
// vpmaddwd and a vpaddd per 16. The kernel is q8_gemm_dot4_ymm.h's with 6 rows
// x 16 columns (12 accumulators + 2 weights + 1 broadcast of 16 ymm
// registers); the activation quantizer is the AVX2 one.
#include "q8/q8_gemm_dot4_ymm.h"

namespace pycompress {
namespace q8 {
namespace {

struct VnniDot {
  static constexpr int kRows = 6;
  static __m256i step(__m256i acc, __m256i a4, __m256i w) { return _mm256_dpbusd_avx_epi32(acc, a4, w); }
};

void gemm_tile_avxvnni(const GemmTile& t) { dot4_gemm_tile<VnniDot>(t); }

}  // namespace

const Kernels& kernels_avxvnni() {
  static const Kernels k{kernels_avx2().quantize_rows, gemm_tile_avxvnni};
  return k;
}

}  // namespace q8
}  // namespace pycompress
