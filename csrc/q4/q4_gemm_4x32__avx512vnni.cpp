// AVX-512 VNNI path of the W4A8 GEMM (q4_gemm.h): a block of one panel (16
// channels x 8 k, 64 bytes) is one zmm load that unpacks to two vpdpbusd
// operands (the stored nibbles w + 8, masked or shifted out; a group's sum
// then subtracts 8 x its activation sum).
// Microkernel: up to 4 rows x 32 columns (8 int32 + 8 float accumulators,
// 4 weight operands); one row takes 64 columns, as decode's GEMV reads each
// weight once and wants more independent chains.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/vec_math_avx512.h"
#include "q4/q4_gemm.h"

namespace pycompress {
namespace q4 {
namespace {

constexpr int kMR = 4;

inline __mmask16 tail_mask(int64_t valid) {
  return valid >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>(valid <= 0 ? 0u : (1u << valid) - 1u);
}

template <int MR, int NV>
void tile_rows(const Tile& t, int64_t r0, int64_t n) {
  const int64_t panel_bytes = (t.kp / kKBlock) * kBlockBytes;
  const int64_t blocks_per_group = t.kp / t.groups / kKBlock;
  const uint8_t* w = t.w + (n / kPanel) * panel_bytes;
  const float* gs = t.g_scale + (n / kPanel) * t.groups * kPanel;
  const uint8_t* a = t.a + r0 * t.lda;
  const __m512i low4 = _mm512_set1_epi8(0x0F);

  __m512 facc[MR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) facc[r][v] = _mm512_setzero_ps();

  for (int64_t g = 0, kb = 0; g < t.groups; ++g) {
    __m512i acc[MR][NV];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
    // One row (decode): the high nibbles' products go to a second set of
    // accumulators, so no accumulator waits on two vpdpbusd a block.
    constexpr int kHi = MR == 1 ? NV : 1;
    __m512i hi_acc[kHi];
#pragma GCC unroll 4
    for (int v = 0; v < kHi; ++v) hi_acc[v] = _mm512_setzero_si512();
    for (const int64_t end = kb + blocks_per_group; kb < end; ++kb) {
      __m512i wlo[NV], whi[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512i p = _mm512_loadu_si512(w + v * panel_bytes + kb * kBlockBytes);
        wlo[v] = _mm512_and_si512(p, low4);
        whi[v] = _mm512_and_si512(_mm512_srli_epi16(p, 4), low4);
      }
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        int32_t a8[2];
        std::memcpy(a8, a + r * t.lda + kb * kKBlock, sizeof a8);
        const __m512i alo = _mm512_set1_epi32(a8[0]), ahi = _mm512_set1_epi32(a8[1]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], alo, wlo[v]);
          if constexpr (MR == 1) {
            hi_acc[v] = _mm512_dpbusd_epi32(hi_acc[v], ahi, whi[v]);
          } else {
            acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], ahi, whi[v]);
          }
        }
      }
    }
    if constexpr (MR == 1) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][v] = _mm512_add_epi32(acc[0][v], hi_acc[v]);
    }
    __m512i bias[MR];  // the nibbles' +8, times each row's activation sum over the group
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) bias[r] = _mm512_set1_epi32(bias_sum(t, r0 + r, kb - blocks_per_group, kb));
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 s = _mm512_loadu_ps(gs + v * t.groups * kPanel + g * kPanel);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m512i exact = _mm512_sub_epi32(acc[r][v], bias[r]);
        facc[r][v] = _mm512_add_ps(facc[r][v], _mm512_mul_ps(_mm512_cvtepi32_ps(exact), s));
      }
    }
  }

#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t c = n + v * kPanel;
    const __mmask16 mask = tail_mask(t.n0 + t.ncols - c);
    const __m512 corr = _mm512_loadu_ps(t.corr + c);  // padded to Np
    const __m512 bias = t.bias != nullptr ? _mm512_maskz_loadu_ps(mask, t.bias + c) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      __m512 y = _mm512_sub_ps(facc[r][v], _mm512_mul_ps(_mm512_set1_ps(static_cast<float>(t.row_zp[r0 + r])), corr));
      y = _mm512_mul_ps(y, _mm512_set1_ps(t.row_scale[r0 + r]));
      if (t.bias != nullptr) y = _mm512_add_ps(y, bias);
      y = apply_activation_avx512(y, t.act);
      _mm512_mask_storeu_ps(t.y + (r0 + r) * t.ldy + c, mask, y);
    }
  }
}

// Rows [r0, r0 + MR) against the tile's panels, NV at a time (then fewer).
template <int MR, int NV>
void row_block(const Tile& t, int64_t r0) {
  const int64_t end = t.n0 + t.ncols;
  int64_t n = t.n0;
  for (; n + (NV - 1) * kPanel < end; n += NV * kPanel) tile_rows<MR, NV>(t, r0, n);
  if constexpr (NV > 1) {
    for (; n < end; n += kPanel) tile_rows<MR, 1>(t, r0, n);
  }
}

// ---- taller tiles: weights unpacked once per tile --------------------------
//
// With several row blocks, unpacking each block's nibbles per row block would
// cost as many shuffles as multiplies. Instead a chunk of up to kChunkBlocks
// blocks of up to four panels is unpacked once into int8 operands (L1), and
// every row block of kTallRows rows then runs plain vpdpbusd over them with
// its int32 sums in registers; the sums of a group spanning several chunks and
// the float accumulators wait in per-tile scratch between chunks.
constexpr int kTallRows = 4;
constexpr int64_t kChunkBlocks = 16;

struct TallScratch {
  alignas(64) int8_t w[kChunkBlocks][4][2][64];  // [block][panel][low/high nibbles] operands
  std::vector<int32_t> acc;  // [row][panel][16] int32 sums of the current group
  std::vector<float> facc;   // [row][panel][16] float accumulators
};

template <int MR, int NV>
void tall_rows(const Tile& t, TallScratch& s, int64_t r0, int64_t group_kb0, int64_t kb0, int64_t nb, bool first,
               bool last, const float* scales) {
  const uint8_t* a = t.a + r0 * t.lda;
  __m512i acc[MR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(&s.acc[((r0 + r) * 4 + v) * 16]);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i wlo[NV], whi[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      wlo[v] = _mm512_load_si512(s.w[b][v][0]);
      whi[v] = _mm512_load_si512(s.w[b][v][1]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      int32_t a8[2];
      std::memcpy(a8, a + r * t.lda + (kb0 + b) * kKBlock, sizeof a8);
      const __m512i alo = _mm512_set1_epi32(a8[0]), ahi = _mm512_set1_epi32(a8[1]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], alo, wlo[v]);
        acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], ahi, whi[v]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (!last) {
        _mm512_storeu_si512(&s.acc[((r0 + r) * 4 + v) * 16], acc[r][v]);
        continue;
      }
      float* f = &s.facc[((r0 + r) * 4 + v) * 16];
      const __m512i exact = _mm512_sub_epi32(acc[r][v], _mm512_set1_epi32(bias_sum(t, r0 + r, group_kb0, kb0 + nb)));
      const __m512 sum = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), _mm512_loadu_ps(scales + v * t.groups * kPanel));
      _mm512_storeu_ps(f, _mm512_add_ps(_mm512_loadu_ps(f), sum));
    }
  }
}

template <int NV>
void tall_tile(const Tile& t, TallScratch& s, int64_t n) {
  const int64_t panel_bytes = (t.kp / kKBlock) * kBlockBytes;
  const int64_t blocks_per_group = t.kp / t.groups / kKBlock;
  const uint8_t* w = t.w + (n / kPanel) * panel_bytes;
  const float* gs = t.g_scale + (n / kPanel) * t.groups * kPanel;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  std::fill(s.facc.begin(), s.facc.begin() + t.m * 4 * 16, 0.0f);
  for (int64_t g = 0; g < t.groups; ++g) {
    for (int64_t c0 = 0; c0 < blocks_per_group; c0 += kChunkBlocks) {
      const int64_t nb = std::min(kChunkBlocks, blocks_per_group - c0);
      const int64_t kb0 = g * blocks_per_group + c0;
      for (int64_t b = 0; b < nb; ++b) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          const __m512i p = _mm512_loadu_si512(w + v * panel_bytes + (kb0 + b) * kBlockBytes);
          _mm512_store_si512(s.w[b][v][0], _mm512_and_si512(p, low4));
          _mm512_store_si512(s.w[b][v][1], _mm512_and_si512(_mm512_srli_epi16(p, 4), low4));
        }
      }
      const bool first = c0 == 0, last = c0 + nb >= blocks_per_group;
      int64_t r0 = 0;
      for (; r0 + kTallRows <= t.m; r0 += kTallRows) tall_rows<kTallRows, NV>(t, s, r0, g * blocks_per_group, kb0, nb, first, last, gs + g * kPanel);
      switch (t.m - r0) {
        case 3: tall_rows<3, NV>(t, s, r0, g * blocks_per_group, kb0, nb, first, last, gs + g * kPanel); break;
        case 2: tall_rows<2, NV>(t, s, r0, g * blocks_per_group, kb0, nb, first, last, gs + g * kPanel); break;
        case 1: tall_rows<1, NV>(t, s, r0, g * blocks_per_group, kb0, nb, first, last, gs + g * kPanel); break;
        default: break;
      }
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t c = n + v * kPanel;
    const __mmask16 mask = tail_mask(t.n0 + t.ncols - c);
    const __m512 corr = _mm512_loadu_ps(t.corr + c);
    const __m512 bias = t.bias != nullptr ? _mm512_maskz_loadu_ps(mask, t.bias + c) : _mm512_setzero_ps();
    for (int64_t r = 0; r < t.m; ++r) {
      __m512 y = _mm512_sub_ps(_mm512_loadu_ps(&s.facc[(r * 4 + v) * 16]), _mm512_mul_ps(_mm512_set1_ps(static_cast<float>(t.row_zp[r])), corr));
      y = _mm512_mul_ps(y, _mm512_set1_ps(t.row_scale[r]));
      if (t.bias != nullptr) y = _mm512_add_ps(y, bias);
      y = apply_activation_avx512(y, t.act);
      _mm512_mask_storeu_ps(t.y + r * t.ldy + c, mask, y);
    }
  }
}

void gemm_tile_tall(const Tile& t) {
  thread_local TallScratch s;
  if (s.acc.size() < static_cast<size_t>(t.m * 4 * 16)) {
    s.acc.resize(t.m * 4 * 16);
    s.facc.resize(t.m * 4 * 16);
  }
  switch ((t.ncols + kPanel - 1) / kPanel) {
    case 1: return tall_tile<1>(t, s, t.n0);
    case 2: return tall_tile<2>(t, s, t.n0);
    case 3: return tall_tile<3>(t, s, t.n0);
    default: return tall_tile<4>(t, s, t.n0);
  }
}

void gemm_tile_avx512(const Tile& t) {
  if (t.m > 2 * kMR) return gemm_tile_tall(t);
  int64_t r0 = 0;
  for (; r0 + kMR <= t.m; r0 += kMR) row_block<kMR, 2>(t, r0);
  switch (t.m - r0) {
    case 3: return row_block<3, 2>(t, r0);
    case 2: return row_block<2, 2>(t, r0);
    case 1: return row_block<1, 4>(t, r0);
    default: return;
  }
}

}  // namespace

const Kernels& kernels_avx512vnni() {
  static const Kernels k{gemm_tile_avx512};
  return k;
}

}  // namespace q4
}  // namespace pycompress
