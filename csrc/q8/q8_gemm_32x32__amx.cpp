// AMX path (Sapphire Rapids and later): tdpbusd multiplies a tile of 16 rows x
// 64 quantized activations (u8) by a tile of 16 k-quads x 16 columns of weights
// (s8) into 16 x 16 int32 sums, 16K multiply-adds an instruction. The packed
// weight layout (q8_gemm.h) already is that B operand: a panel's 64 consecutive
// k are 16 rows of 64 bytes, one row per k-quad, so tiles load straight from it.
// The activations are packed once per pass into contiguous 1 KiB tiles
// (pack_rows; q8_gemm.h): read row by row from the quantized rows (16 rows
// kp bytes apart, each on its own page for large K) the tiles ran at ~60% of the
// rate of contiguous ones (bench/peak-style loop, K = 4096, Intel Xeon with AMX).
//
// Microkernel: up to 32 rows x 32 columns, C in tmm0-3 (2 x 2 tiles), A in
// tmm4-5, B in tmm6-7; every tile is 16 rows x 64 bytes (one configuration).
// A panel pair's weights stay in L1 while every row block of the tile passes
// them (loop order), and the weights two k steps ahead are prefetched into L1.
// The int32 sums are the same integers as every other path's (exact in any
// order), stored to a 4 KiB buffer and finished by the AVX-512 epilogue.
//
// Edges without reconfiguring (ldtilecfg zeroes every tile): the packed rows
// hold zeros past m and kp; a weight tail of kp % 64 k is read from a
// zero-padded copy, so no load passes the end of the weights; sums of rows
// past m are dropped.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/amx.h"
#include "q8/q8_epilogue_avx512.h"
#include "q8/q8_gemm.h"

namespace pycompress {
namespace q8 {
namespace {

constexpr int64_t kTileK = kAmxK;  // k per tdpbusd: bytes of an activation tile row
constexpr int64_t kTileBytes = kAmxTileBytes;
constexpr int64_t kPrefetchK = 2 * kTileK;  // weights prefetched this far ahead
constexpr int kMaxPanels = static_cast<int>(kTileCols / kPanel);

// Rows [r0, r0 + 16 * MB) (r0 a multiple of 16) x panels [p, p + NB) of the
// tile. `b[j]` is panel p + j's weights, `tail[j]` its last kp % 64 k
// zero-padded to 64.
template <int MB, int NB>
void block(const GemmTile& t, int64_t r0, int p, const int8_t* const* b, const int8_t* const* tail,
           int32_t* sums) {
  static_assert(MB >= 1 && MB <= 2 && NB >= 1 && NB <= 2, "C tiles are tmm0-3");
  const uint8_t* a0 = t.a + r0 / kAmxRows * t.lda;
  const uint8_t* a1 = a0 + t.lda;
  const int64_t kfull = t.kp / kTileK * kTileK;
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (MB == 2) _tile_zero(2);
  if constexpr (MB == 2 && NB == 2) _tile_zero(3);
  // One k step: weights b0 / b1 (64 bytes a row), activations at byte offset `at` of each row block.
  auto step = [&](const int8_t* b0, const int8_t* b1, int64_t at) {
    _tile_loadd(6, b0, 64);
    if constexpr (NB == 2) _tile_loadd(7, b1, 64);
    _tile_loadd(4, a0 + at, 64);
    _tile_dpbusd(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbusd(1, 4, 7);
    if constexpr (MB == 2) {
      _tile_loadd(5, a1 + at, 64);
      _tile_dpbusd(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbusd(3, 5, 7);
    }
  };
  const int8_t* b0 = b[0];
  const int8_t* b1 = NB == 2 ? b[1] : b[0];
  int64_t k = 0;
  for (; k < kfull; k += kTileK) {
    // Prefetches may pass the panel's end: they never fault.
#pragma GCC unroll 16
    for (int64_t line = 0; line < kTileBytes; line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(b0 + (k + kPrefetchK) * kPanel + line), _MM_HINT_T0);
      if constexpr (NB == 2) {
        _mm_prefetch(reinterpret_cast<const char*>(b1 + (k + kPrefetchK) * kPanel + line), _MM_HINT_T0);
      }
    }
    step(b0 + k * kPanel, b1 + k * kPanel, k / kTileK * kTileBytes);
  }
  if (kfull < t.kp) step(tail[0], NB == 2 ? tail[1] : tail[0], k / kTileK * kTileBytes);

  // sums: 32 rows x 32 columns, row stride 128 bytes.
  _tile_stored(0, sums, 128);
  if constexpr (NB == 2) _tile_stored(1, sums + 16, 128);
  if constexpr (MB == 2) _tile_stored(2, sums + 16 * 32, 128);
  if constexpr (MB == 2 && NB == 2) _tile_stored(3, sums + 16 * 32 + 16, 128);
  const int64_t rows = std::min<int64_t>(16 * MB, t.m - r0);
#pragma GCC unroll 2
  for (int j = 0; j < NB; ++j) {
    const PanelEpilogue epilogue(t, t.n0 + (p + j) * kPanel);
    for (int64_t r = 0; r < rows; ++r) epilogue.store(r0 + r, _mm512_load_si512(sums + r * 32 + j * 16));
  }
}

// Panels [p, p + NB) against every row of the tile: the pair's weights (2 x 16 x
// kp bytes) stay in L1 while the activations stream past them from L2.
template <int NB>
void panel_block(const GemmTile& t, int p, const int8_t* const* b, const int8_t* const* tail, int32_t* sums) {
  int64_t r0 = 0;
  for (; r0 + 16 < t.m; r0 += 32) block<2, NB>(t, r0, p, b + p, tail + p, sums);
  if (r0 < t.m) block<1, NB>(t, r0, p, b + p, tail + p, sums);
}

void gemm_tile_amx(const GemmTile& t) {
  const int panels = static_cast<int>((t.ncols + kPanel - 1) / kPanel);
  const int64_t panel_bytes = t.kp * kPanel;
  const int8_t* b[kMaxPanels];
  const int8_t* tail[kMaxPanels];
  alignas(64) int8_t tail_copy[kMaxPanels][kTileBytes];
  const int64_t kfull = t.kp / kTileK * kTileK;
  for (int p = 0; p < panels; ++p) {
    b[p] = t.w + (t.n0 / kPanel + p) * panel_bytes;
    tail[p] = tail_copy[p];
    if (kfull < t.kp) {
      const int64_t bytes = (t.kp - kfull) * kPanel;
      std::memcpy(tail_copy[p], b[p] + kfull * kPanel, bytes);
      std::memset(tail_copy[p] + bytes, 0, kTileBytes - bytes);
    }
  }
  alignas(64) int32_t sums[32 * 32];
  amx_begin();
  int p = 0;
  for (; p + 2 <= panels; p += 2) panel_block<2>(t, p, b, tail, sums);
  if (p < panels) panel_block<1>(t, p, b, tail, sums);
}

// Rows [0, m) of q (stride lda) into 16-row blocks of 1 KiB tiles (q8_gemm.h).
void pack_rows_amx(const uint8_t* q, int64_t m, int64_t lda, int64_t kp, uint8_t* out) {
  const int64_t steps = amx_steps(kp);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t r0 = 0; r0 < m; r0 += kAmxRows) {
    uint8_t* block_out = out + r0 / kAmxRows * amx_block_bytes(kp);
    for (int64_t r = 0; r < kAmxRows; ++r) {
      const uint8_t* row = q + (r0 + r) * lda;
      for (int64_t s = 0; s < steps; ++s) {
        uint8_t* dst = block_out + s * kTileBytes + r * kTileK;
        if (r0 + r >= m) {
          _mm512_storeu_si512(dst, zero);
          continue;
        }
        const int64_t valid = std::min(kTileK, kp - s * kTileK);
        const __mmask64 mask = valid >= 64 ? ~__mmask64{0} : (__mmask64{1} << valid) - 1;
        _mm512_storeu_si512(dst, _mm512_maskz_loadu_epi8(mask, row + s * kTileK));
      }
    }
  }
}

}  // namespace

const Kernels& kernels_amx() {
  static const Kernels k = [] {
    Kernels amx{kernels_avx512vnni().quantize_rows, gemm_tile_amx};
    amx.pack_rows = pack_rows_amx;
    // Measured (Intel Xeon with AMX, 1 thread, 4096 x 4096): 8 rows 1.2x, 16 rows
    // 1.65x the AVX-512 kernel; 4 rows level.
    amx.min_rows = 8;
    amx.fallback = &kernels_avx512vnni();
    return amx;
  }();
  return k;
}

}  // namespace q8
}  // namespace pycompress
