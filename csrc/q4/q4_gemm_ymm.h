// The ymm W4A8 GEMM (q4_gemm.h), written once over a Dot policy for the two
// ISAs with a ymm u8 x s8 dot product:
//   AVX-VNNI  two vpdpbusd per block (exact for u8);
//   AVX2      vpmaddubsw of the low and of the high nibbles' k, summed in
//             int16, then vpmaddwd by ones into int32. Exact for u8: the
//             nibbles are w + 8 in [0, 15], so a vpmaddubsw pair is at most
//             255 * 15 * 2 = 7650 and the sum of two 15300, below int16's
//             limit; 8-bit weights would saturate.
// Policy: `static __m256i step2(__m256i acc, __m256i alo, __m256i wlo,
// __m256i ahi, __m256i whi)` (both halves of a block into one accumulator),
// `static constexpr int kRows`, and `kSplitRow`: one row instead takes
// `step(acc, a, w)` per half into two accumulator sets (for VNNI, whose two
// vpdpbusd a block would otherwise form one dependent chain).
//
// A block's 32 bytes of one half panel (8 channels x 8 k) unpack to two
// operands: the stored nibbles (w + 8) masked (and shifted) out; a group's sum
// then subtracts 8 x the row's activation sum over it (bias_sum). Each lane's int32 sum is one channel's, so no fold is needed;
// a group ends in the float epilogue's convert, scale multiply and add.
// Internal linkage: included by translation units with different ISA flags.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "common/vec_math_avx2.h"
#include "q4/q4_gemm.h"
#include "q8/q8_store_avx2.h"

namespace pycompress {
namespace q4 {
namespace {

template <class Dot, int MR, int NP>
void ymm_tile_rows(const Tile& t, int64_t r0, int64_t n) {
  constexpr int NV = 2 * NP;
  const int64_t panel_bytes = (t.kp / kKBlock) * kBlockBytes;
  const int64_t blocks_per_group = t.kp / t.groups / kKBlock;
  const uint8_t* w = t.w + (n / kPanel) * panel_bytes;
  const float* gs = t.g_scale + (n / kPanel) * t.groups * kPanel;
  const uint8_t* a = t.a + r0 * t.lda;
  const __m256i low4 = _mm256_set1_epi8(0x0F);

  __m256 facc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) facc[r][v] = _mm256_setzero_ps();

  for (int64_t g = 0, kb = 0; g < t.groups; ++g) {
    __m256i acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_si256();
    // With Dot::kSplitRow (two dependent vpdpbusd a block), one row sums the
    // high nibbles' products apart, so no accumulator waits on both.
    constexpr bool kSplit = Dot::kSplitRow && MR == 1;
    __m256i hi_acc[kSplit ? NV : 1];
#pragma GCC unroll 8
    for (int v = 0; v < (kSplit ? NV : 1); ++v) hi_acc[v] = _mm256_setzero_si256();
    for (const int64_t end = kb + blocks_per_group; kb < end; ++kb) {
      __m256i wlo[NV], whi[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const __m256i p = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(w + (v / 2) * panel_bytes + kb * kBlockBytes + (v % 2) * 32));
        wlo[v] = _mm256_and_si256(p, low4);
        whi[v] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low4);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t lo4, hi4;  // each broadcast straight from memory (a load, not an ALU op)
        std::memcpy(&lo4, a + r * t.lda + kb * kKBlock, 4);
        std::memcpy(&hi4, a + r * t.lda + kb * kKBlock + 4, 4);
        const __m256i alo = _mm256_set1_epi32(lo4), ahi = _mm256_set1_epi32(hi4);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          if constexpr (kSplit) {
            acc[r][v] = Dot::step(acc[r][v], alo, wlo[v]);
            hi_acc[v] = Dot::step(hi_acc[v], ahi, whi[v]);
          } else {
            acc[r][v] = Dot::step2(acc[r][v], alo, wlo[v], ahi, whi[v]);
          }
          __asm__("" : "+x"(acc[r][v]));  // keeps GCC from issuing every product first and spilling
        }
      }
    }
    if constexpr (kSplit) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[0][v] = _mm256_add_epi32(acc[0][v], hi_acc[v]);
    }
    __m256i bias[MR];  // the nibbles' +8, times each row's activation sum over the group
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) bias[r] = _mm256_set1_epi32(bias_sum(t, r0 + r, kb - blocks_per_group, kb));
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __m256 s = _mm256_loadu_ps(gs + (v / 2) * t.groups * kPanel + g * kPanel + (v % 2) * 8);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256i exact = _mm256_sub_epi32(acc[r][v], bias[r]);
        facc[r][v] = _mm256_add_ps(facc[r][v], _mm256_mul_ps(_mm256_cvtepi32_ps(exact), s));
      }
    }
  }

#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t c = n + 8 * v;
    const __m256i mask = q8::tail_mask8(t.n0 + t.ncols - c);
    const __m256 corr = _mm256_loadu_ps(t.corr + c);  // padded to Np
    const __m256 bias = t.bias != nullptr ? _mm256_maskload_ps(t.bias + c, mask) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      __m256 y = _mm256_sub_ps(facc[r][v], _mm256_mul_ps(_mm256_set1_ps(static_cast<float>(t.row_zp[r0 + r])), corr));
      y = _mm256_mul_ps(y, _mm256_set1_ps(t.row_scale[r0 + r]));
      if (t.bias != nullptr) y = _mm256_add_ps(y, bias);
      y = apply_activation_avx2(y, t.act);
      _mm256_maskstore_ps(t.y + (r0 + r) * t.ldy + c, mask, y);
    }
  }
}

// Rows [r0, r0 + MR) against the tile's panels from column n on, NP panels at
// a time; fewer than NP left go NP - 1 at a time.
template <class Dot, int MR, int NP>
void ymm_row_block(const Tile& t, int64_t r0, int64_t n) {
  const int64_t end = t.n0 + t.ncols;
  for (; n + (NP - 1) * kPanel < end; n += NP * kPanel) ymm_tile_rows<Dot, MR, NP>(t, r0, n);
  if constexpr (NP > 1) {
    if (n < end) ymm_row_block<Dot, MR, NP - 1>(t, r0, n);
  }
}

template <class Dot, int MR>
void ymm_rows_from(const Tile& t, int64_t r0) {
  if constexpr (MR >= 2) {
    if (t.m - r0 == MR) return ymm_row_block<Dot, MR, 1>(t, r0, t.n0);
    return ymm_rows_from<Dot, MR - 1>(t, r0);
  } else {
    // One row: two panels a pass, one when the row splits its accumulators (register budget).
    if (t.m - r0 == 1) ymm_row_block<Dot, 1, Dot::kSplitRow ? 1 : 2>(t, r0, t.n0);
  }
}

template <class Dot>
void ymm_gemm_tile(const Tile& t) {
  int64_t r0 = 0;
  for (; r0 + Dot::kRows <= t.m; r0 += Dot::kRows) ymm_row_block<Dot, Dot::kRows, 1>(t, r0, t.n0);
  if (r0 < t.m) ymm_rows_from<Dot, Dot::kRows - 1>(t, r0);
}

}  // namespace
}  // namespace q4
}  // namespace pycompress
