// AVX-VNNI path: the VEX-encoded ymm vpdpbusd (u8 x s8 -> s32, 4-wide dot
// products accumulated in int32) of Intel Alder Lake / Sapphire Rapids and
// AMD Zen 5: exact like the AVX-512 VNNI path, at 8 channels a vector, and one
// instruction per 32 multiply-adds where the exact AVX2 path needs a widen, a
// vpmaddwd and a vpaddd per 16.
//
// Layout use: a packed group (16 channels x 4 k, 64 bytes) is two ymm
// operands, channels 0-7 and 8-15; each lane's dot product is one channel's
// 4-k sum, so no fold is needed. Microkernel: up to 6 rows x 16 columns (12
// accumulators + 2 weights + 1 broadcast of 16 ymm registers); fewer rows take
// more panels at once (2 rows x 32 columns, 1 row x 64) so a small batch still
// has 8 independent accumulator chains. The activation quantizer is the AVX2
// one (kernels_avxvnni).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "q8/q8_gemm.h"
#include "q8/q8_store_avx2.h"

namespace pycompress {
namespace q8 {
namespace {

constexpr int kMR = 6;

template <int MR, int NP>
void tile_rows(const GemmTile& t, int64_t r0, int64_t n) {
  constexpr int NV = 2 * NP;
  const int64_t groups = t.kp / kKGroup;
  const int64_t panel_bytes = t.kp * kPanel;
  const int8_t* w = t.w + (n / kPanel) * panel_bytes;
  const uint8_t* a = t.a + r0 * t.lda;

  __m256i acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_si256();

  for (int64_t g = 0; g < groups; ++g) {
    __m256i wv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      wv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (v / 2) * panel_bytes + g * 64 + (v % 2) * 32));
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * t.lda + g * kKGroup, sizeof a4);
      const __m256i ab = _mm256_set1_epi32(a4);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_dpbusd_avx_epi32(acc[r][v], ab, wv[v]);
    }
  }

#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const Columns8 cols = load_columns8(t, n + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) store_row8(t, cols, r0 + r, acc[r][v]);
  }
}

// Rows [r0, r0 + MR) against the tile's panels from column n on, NP panels at
// a time (the last of them may be partial); fewer than NP left go NP - 1 at a time.
template <int MR, int NP>
void row_block(const GemmTile& t, int64_t r0, int64_t n) {
  const int64_t end = t.n0 + t.ncols;
  for (; n + (NP - 1) * kPanel < end; n += NP * kPanel) tile_rows<MR, NP>(t, r0, n);
  if constexpr (NP > 1) {
    if (n < end) row_block<MR, NP - 1>(t, r0, n);
  }
}

void gemm_tile_avxvnni(const GemmTile& t) {
  int64_t r0 = 0;
  for (; r0 + kMR <= t.m; r0 += kMR) row_block<kMR, 1>(t, r0, t.n0);
  switch (t.m - r0) {
    case 5: return row_block<5, 1>(t, r0, t.n0);
    case 4: return row_block<4, 1>(t, r0, t.n0);
    case 3: return row_block<3, 1>(t, r0, t.n0);
    case 2: return row_block<2, 2>(t, r0, t.n0);
    case 1: return row_block<1, 4>(t, r0, t.n0);
    default: return;
  }
}

}  // namespace

const Kernels& kernels_avxvnni() {
  static const Kernels k{kernels_avx2().quantize_rows, gemm_tile_avxvnni};
  return k;
}

}  // namespace q8
}  // namespace pycompress
