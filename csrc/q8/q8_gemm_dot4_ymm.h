// The ymm int8 GEMM over whole 4-k groups: one "dot4" step adds, per lane, one
// channel's 4-k dot product of a u8 activation group and its s8 weights to an
// int32 accumulator. Two ISAs have such a step:
//   AVX-VNNI   vpdpbusd ymm: exact for u8 activations;
//   AVX2       vpmaddubsw (pairs into int16) + vpmaddwd by ones (pairs into
//              int32) + vpaddd: exact only for u7 activations, whose pair sums
//              fit int16 (the u7 format, q8_gemm.h); u8 pairs can saturate.
// Both give the same int32 sums, so both kernels are written once here over a
// Dot policy: `static __m256i step(__m256i acc, __m256i a4, __m256i w)` and
// `static constexpr int kRows` (the tallest row block that fits the 16 ymm
// registers beside the policy's own).
//
// Layout use: a packed group (16 channels x 4 k, 64 bytes) is two ymm
// operands, channels 0-7 and 8-15; each lane's sum is one channel's, so no
// fold is needed. Fewer rows than kRows take more panels at once (2 rows x 32
// columns, 1 row x 64) so a small batch still has 8 independent accumulator
// chains. Internal linkage: included by translation units with different flags.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "q8/q8_gemm.h"
#include "q8/q8_store_avx2.h"

namespace pycompress {
namespace q8 {
namespace {

template <class Dot, int MR, int NP>
void dot4_tile_rows(const GemmTile& t, int64_t r0, int64_t n) {
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
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = Dot::step(acc[r][v], ab, wv[v]);
        // Pins the sum here: left alone, GCC may issue every product first and
        // spill the accumulators it no longer has registers for.
        __asm__("" : "+x"(acc[r][v]));
      }
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
template <class Dot, int MR, int NP>
void dot4_row_block(const GemmTile& t, int64_t r0, int64_t n) {
  const int64_t end = t.n0 + t.ncols;
  for (; n + (NP - 1) * kPanel < end; n += NP * kPanel) dot4_tile_rows<Dot, MR, NP>(t, r0, n);
  if constexpr (NP > 1) {
    if (n < end) dot4_row_block<Dot, MR, NP - 1>(t, r0, n);
  }
}

// Row blocks of Dot::kRows (one panel at a time), then the remainder.
template <class Dot, int MR>
void dot4_rows_from(const GemmTile& t, int64_t r0) {
  if constexpr (MR >= 3) {
    if (t.m - r0 == MR) return dot4_row_block<Dot, MR, 1>(t, r0, t.n0);
    return dot4_rows_from<Dot, MR - 1>(t, r0);
  } else if constexpr (MR == 2) {
    if (t.m - r0 == 2) return dot4_row_block<Dot, 2, 2>(t, r0, t.n0);
    return dot4_rows_from<Dot, 1>(t, r0);
  } else {
    if (t.m - r0 == 1) dot4_row_block<Dot, 1, 4>(t, r0, t.n0);
  }
}

template <class Dot>
void dot4_gemm_tile(const GemmTile& t) {
  int64_t r0 = 0;
  for (; r0 + Dot::kRows <= t.m; r0 += Dot::kRows) dot4_row_block<Dot, Dot::kRows, 1>(t, r0, t.n0);
  if (r0 < t.m) dot4_rows_from<Dot, Dot::kRows - 1>(t, r0);
}

}  // namespace
}  // namespace q8
}  // namespace pycompress
