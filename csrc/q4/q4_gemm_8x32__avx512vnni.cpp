// AVX-512 VNNI path of the W4A8 GEMM (q4_gemm.h): a block of one panel (16
// channels x 8 k, 64 bytes) is one zmm load that unpacks to two vpdpbusd
// operands (the stored nibbles w + 8, masked or shifted out; a group's sum
// then subtracts 8 x its activation sum).
// Microkernel: up to 8 rows x 32 columns (16 int32 accumulators, 4 weight
// operands; the float group sums of 5-8 rows in L1, touched once a group);
// a remainder of 5-7 rows is one block, as each block unpacks the tile's
// weights again; one row takes 64 columns, as decode's GEMV reads each weight
// once and wants more independent chains. (Unpacking a tall tile's
// nibbles once into an L1 buffer for all its row blocks was tried: 10-15%
// slower at 16-32 rows on Zen 5, so each row block unpacks its own.)
#include <immintrin.h>

#include <cstring>

#include "q4/q4_epilogue_avx512.h"
#include "q4/q4_gemm.h"

namespace pycompress {
namespace q4 {
namespace {

constexpr int kMR = 8;

// acc += u8 x s8 (vpdpbusd). The inline-asm form (vec_math_avx512.h) for the
// 1-2 and 5-8-row blocks, where GCC 12 copied accumulators around the
// intrinsic; the intrinsic for 3-4 rows, where the asm form made it spill
// (measured: (4,768,768) 16 us against 21).
template <int MR>
inline void dot4(__m512i& acc, __m512i u8, __m512i s8) {
  if constexpr (MR == 3 || MR == 4) {
    acc = _mm512_dpbusd_epi32(acc, u8, s8);
  } else {
    dpbusd_avx512(acc, u8, s8);
  }
}

template <int MR, int NV>
void tile_rows(const Tile& t, int64_t r0, int64_t n) {
  const int64_t panel_bytes = (t.kp / kKBlock) * kBlockBytes;
  const int64_t blocks_per_group = t.kp / t.groups / kKBlock;
  const uint8_t* w = t.w + (n / kPanel) * panel_bytes;
  const float* gs = t.g_scale + (n / kPanel) * t.groups * kPanel;
  const uint8_t* a = t.a + r0 * t.lda;
  const __m512i low4 = _mm512_set1_epi8(0x0F);

  // One or two rows: the high nibbles' products go to a second set of
  // accumulators, so no accumulator takes two vpdpbusd a block (decode's few
  // rows would otherwise be bound by vpdpbusd latency).
  constexpr bool kSplit = MR <= 2;
  constexpr int kHi = kSplit ? MR * NV : 1;
  // The float group sums, touched once a group: in registers up to 8, in L1
  // where the 5-8-row blocks' int32 accumulators need the registers.
  constexpr bool kFloatInMemory = MR * NV > 8;
  constexpr int kFloatRegs = kFloatInMemory ? 1 : MR * NV;
  __m512 facc[kFloatRegs];
  alignas(64) float fmem[kFloatInMemory ? MR * NV * kPanel : 1];
#pragma GCC unroll 16
  for (int i = 0; i < kFloatRegs; ++i) facc[i] = _mm512_setzero_ps();
  if constexpr (kFloatInMemory) std::memset(fmem, 0, sizeof(fmem));

  for (int64_t g = 0, kb = 0; g < t.groups; ++g) {
    __m512i acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
    __m512i hi_acc[kHi];
#pragma GCC unroll 8
    for (int v = 0; v < kHi; ++v) hi_acc[v] = _mm512_setzero_si512();
    for (const int64_t end = kb + blocks_per_group; kb < end; ++kb) {
      __m512i wlo[NV], whi[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512i p = _mm512_loadu_si512(w + v * panel_bytes + kb * kBlockBytes);
        wlo[v] = _mm512_and_si512(p, low4);
        whi[v] = _mm512_and_si512(_mm512_srli_epi16(p, 4), low4);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        // Each 4-byte half broadcast straight from memory (a load, not an ALU op).
        int32_t lo4, hi4;
        std::memcpy(&lo4, a + r * t.lda + kb * kKBlock, 4);
        std::memcpy(&hi4, a + r * t.lda + kb * kKBlock + 4, 4);
        const __m512i alo = _mm512_set1_epi32(lo4), ahi = _mm512_set1_epi32(hi4);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          dot4<MR>(acc[r][v], alo, wlo[v]);
          dot4<MR>(kSplit ? hi_acc[r * NV + v] : acc[r][v], ahi, whi[v]);
        }
      }
    }
    if constexpr (kSplit) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_add_epi32(acc[r][v], hi_acc[r * NV + v]);
    }
    __m512i bias[MR];  // the nibbles' +8, times each row's activation sum over the group
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) bias[r] = _mm512_set1_epi32(bias_sum(t, r0 + r, kb - blocks_per_group, kb));
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 s = _mm512_loadu_ps(gs + v * t.groups * kPanel + g * kPanel);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 term = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], bias[r])), s);
        if constexpr (kFloatInMemory) {
          float* f = fmem + (r * NV + v) * kPanel;
          _mm512_store_ps(f, _mm512_add_ps(_mm512_load_ps(f), term));
        } else {
          facc[r * NV + v] = _mm512_add_ps(facc[r * NV + v], term);
        }
      }
    }
  }

#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const PanelEpilogue epilogue(t, n + v * kPanel);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const int i = r * NV + v;
      epilogue.store(r0 + r, kFloatInMemory ? _mm512_load_ps(fmem + i * kPanel) : facc[kFloatInMemory ? 0 : i]);
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

void gemm_tile_avx512(const Tile& t) {
  int64_t r0 = 0;
  for (; r0 + kMR <= t.m; r0 += kMR) row_block<kMR, 2>(t, r0);
  switch (t.m - r0) {  // the rest in one block: each block reads the tile's weights again
    case 7: return row_block<7, 2>(t, r0);
    case 6: return row_block<6, 2>(t, r0);
    case 5: return row_block<5, 2>(t, r0);
    case 4: return row_block<4, 2>(t, r0);
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
