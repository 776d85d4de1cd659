// AMX path of the W4A8 GEMM (q4_gemm.h) on the activations packed into 1 KiB
// tiles (q8_gemm.h, pack_rows). A panel's nibbles unpack to the int8 B operand
// of tdpbusd: packed block kb (8 k x 16 channels, 64 bytes) gives k-quad 2kb
// (its low nibbles) and 2kb + 1 (its high nibbles), two 64-byte tile rows, so
// 8 blocks are one 16-row B tile. A tile of up to 32 rows (one row block: decode
// and small batches) unpacks each k step one step before its tiles, so reading the
// weights overlaps the tiles' work; a taller tile unpacks its panel pair once
// into a per-thread buffer and every row block passes it.
//
// Microkernel: 32 rows x 32 columns (C in tmm0-3, A in tmm4-5, B in tmm6-7).
// Each group's int32 sums (the stored nibbles w + 8 against the activations)
// are stored after its k steps, less 8 x the rows' activation sums over the
// group, and added to float accumulators in a 4 KiB buffer in the contract's
// order; the epilogue then finishes them as the AVX-512 path does.
//
// A group must be whole k steps (64 k), or the whole K: other group sizes (32,
// 96, ...), tiles without packed rows and tiles of fewer than kMinRows rows run
// the AVX-512 kernel.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "common/amx.h"
#include "q4/q4_epilogue_avx512.h"
#include "q4/q4_gemm.h"
#include "q8/q8_gemm.h"

namespace pycompress {
namespace q4 {
namespace {

constexpr int64_t kStepK = q8::kAmxK;  // k per tdpbusd: the packed activations' tiles (q8_gemm.h)
constexpr int64_t kTileBytes = q8::kAmxTileBytes;
constexpr int64_t kBlocksPerStep = kStepK / kKBlock;
// Intel Xeon with AMX, 1 thread, 4096 x 4096, groups of 128: 8 rows 0.84x, 16
// rows 1.33x, 32 rows 1.78x the AVX-512 kernel.
constexpr int64_t kMinRows = 12;

// Step s of panel `w` (blocks 8s..8s+7 of 64 bytes) as one int8 B tile, zeros
// past kp (the packed activations hold zeros there too).
inline void unpack_step(const uint8_t* w, int64_t kp, int64_t s, uint8_t* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t blocks = std::min(kBlocksPerStep, kp / kKBlock - s * kBlocksPerStep);
  const uint8_t* src = w + s * kBlocksPerStep * kBlockBytes;
  int64_t kb = 0;
  for (; kb < blocks; ++kb) {
    const __m512i p = _mm512_loadu_si512(src + kb * kBlockBytes);
    _mm512_storeu_si512(out + kb * 128, _mm512_and_si512(p, low4));
    _mm512_storeu_si512(out + kb * 128 + 64, _mm512_and_si512(_mm512_srli_epi16(p, 4), low4));
  }
  for (; kb < kBlocksPerStep; ++kb) {
    _mm512_storeu_si512(out + kb * 128, _mm512_setzero_si512());
    _mm512_storeu_si512(out + kb * 128 + 64, _mm512_setzero_si512());
  }
}

// The whole panel: q8::amx_steps(kp) B tiles of 1 KiB.
void unpack_panel(const uint8_t* w, int64_t kp, uint8_t* out) {
  for (int64_t s = 0; s < q8::amx_steps(kp); ++s) unpack_step(w, kp, s, out + s * kTileBytes);
}

struct Block {
  const Tile& t;
  int64_t step_count;        // k steps of the whole K
  int64_t group_steps;       // k steps of a group
  int64_t blocks_per_group;  // 8-k blocks of a group
};

// Rows [r0, r0 + 16 * MB) x panels [p, p + NB) (column n = n0 + 16p) against
// the unpacked panels b[0..NB), or (kStream) the packed panels b[0..NB), each
// step unpacked into a two-slot ring in L1 one step before its tiles: a tile
// of one row block reads each weight once, and then the weights' stream from
// memory overlaps the tiles' work instead of preceding it.
template <int MB, int NB, bool kStream>
void block(const Block& k, int64_t r0, int64_t n, const uint8_t* const* b, int32_t* sums, float* facc) {
  static_assert(MB >= 1 && MB <= 2 && NB >= 1 && NB <= 2, "C tiles are tmm0-3");
  const Tile& t = k.t;
  const uint8_t* a0 = t.packed + r0 / 16 * t.packed_ld;
  const uint8_t* a1 = a0 + t.packed_ld;
  const int64_t rows = std::min<int64_t>(16 * MB, t.m - r0);
  const float* gs = t.g_scale + (n / kPanel) * t.groups * kPanel;
  for (int64_t i = 0; i < rows * 32; i += 16) _mm512_store_ps(facc + i, _mm512_setzero_ps());
  // kStream: step s + 1 is unpacked before step s's tiles load theirs (written one step earlier), so the
  // tile loads do not wait for the stores just made: AMX loads get no store forwarding (Intel Xeon with AMX,
  // 1 thread, 4096 x 4096, groups of 128, 16 rows, medians of alternating runs: 670 us unpacking each step
  // just before its tiles, 600 one step ahead). Tried and no faster: 4 panels a block for four accumulation
  // chains; deferring each group's float accumulation a group, so it reads sums stored earlier.
  alignas(64) static thread_local uint8_t ring[2][2][kTileBytes];
  const auto unpack = [&](int64_t s) {
    amx_compiler_barrier();  // the tiles of step s - 1 read this slot: its stores stay after them
    unpack_step(b[0], t.kp, s, ring[s & 1][0]);
    if constexpr (NB == 2) unpack_step(b[1], t.kp, s, ring[s & 1][1]);
    amx_compiler_barrier();
  };
  if constexpr (kStream) unpack(0);

  for (int64_t g = 0; g < t.groups; ++g) {
    _tile_zero(0);
    if constexpr (NB == 2) _tile_zero(1);
    if constexpr (MB == 2) _tile_zero(2);
    if constexpr (MB == 2 && NB == 2) _tile_zero(3);
    const int64_t s0 = g * k.group_steps, s1 = std::min(s0 + k.group_steps, k.step_count);
    for (int64_t s = s0; s < s1; ++s) {
      const uint8_t* b0 = b[0] + s * kTileBytes;
      const uint8_t* b1 = NB == 2 ? b[1] + s * kTileBytes : b0;
      if constexpr (kStream) {
        if (s + 1 < k.step_count) unpack(s + 1);
        b0 = ring[s & 1][0];
        b1 = ring[s & 1][1];
      }
      _tile_loadd(6, b0, 64);
      if constexpr (NB == 2) _tile_loadd(7, b1, 64);
      _tile_loadd(4, a0 + s * kTileBytes, 64);
      _tile_dpbusd(0, 4, 6);
      if constexpr (NB == 2) _tile_dpbusd(1, 4, 7);
      if constexpr (MB == 2) {
        _tile_loadd(5, a1 + s * kTileBytes, 64);
        _tile_dpbusd(2, 5, 6);
        if constexpr (NB == 2) _tile_dpbusd(3, 5, 7);
      }
    }
    _tile_stored(0, sums, 128);
    if constexpr (NB == 2) _tile_stored(1, sums + 16, 128);
    if constexpr (MB == 2) _tile_stored(2, sums + 16 * 32, 128);
    if constexpr (MB == 2 && NB == 2) _tile_stored(3, sums + 16 * 32 + 16, 128);
    const int64_t kb0 = g * k.blocks_per_group, kb1 = kb0 + k.blocks_per_group;
#pragma GCC unroll 2
    for (int j = 0; j < NB; ++j) {
      const __m512 s = _mm512_loadu_ps(gs + j * t.groups * kPanel + g * kPanel);
      for (int64_t r = 0; r < rows; ++r) {
        const __m512i exact = _mm512_sub_epi32(_mm512_load_si512(sums + r * 32 + j * 16),
                                               _mm512_set1_epi32(bias_sum(t, r0 + r, kb0, kb1)));
        float* f = facc + r * 32 + j * 16;
        _mm512_store_ps(f, _mm512_add_ps(_mm512_load_ps(f), _mm512_mul_ps(_mm512_cvtepi32_ps(exact), s)));
      }
    }
  }

#pragma GCC unroll 2
  for (int j = 0; j < NB; ++j) {
    const PanelEpilogue epilogue(t, n + j * kPanel);
    for (int64_t r = 0; r < rows; ++r) epilogue.store(r0 + r, _mm512_load_ps(facc + r * 32 + j * 16));
  }
}

template <int NB, bool kStream>
void panel_block(const Block& k, int64_t n, const uint8_t* const* b, int32_t* sums, float* facc) {
  int64_t r0 = 0;
  for (; r0 + 16 < k.t.m; r0 += 32) block<2, NB, kStream>(k, r0, n, b, sums, facc);
  if (r0 < k.t.m) block<1, NB, kStream>(k, r0, n, b, sums, facc);
}

void gemm_tile_amx(const Tile& t) {
  const int64_t gk = t.kp / t.groups;
  if (t.packed == nullptr || t.m < kMinRows || (t.groups > 1 && gk % kStepK != 0)) {
    return kernels_avx512vnni().gemm_tile(t);
  }
  const Block k{t, q8::amx_steps(t.kp), t.groups > 1 ? gk / kStepK : q8::amx_steps(t.kp), gk / kKBlock};
  const int64_t panel_bytes = (t.kp / kKBlock) * kBlockBytes;
  const int64_t unpacked_bytes = k.step_count * kTileBytes;
  // One row block (up to 32 rows): each weight is read once, unpacked step by step (Intel Xeon with AMX,
  // 1 thread, 4096 x 4096, groups of 128: 16 rows 676 us against 1050 unpacking the panels first, 32 rows
  // 1053 against 1403); taller tiles unpack once for all their row blocks (128 rows: 4151 against 4605).
  const bool stream = t.m <= 32;
  thread_local std::vector<uint8_t> unpacked;
  if (!stream && unpacked.size() < static_cast<size_t>(2 * unpacked_bytes)) unpacked.resize(2 * unpacked_bytes);
  alignas(64) int32_t sums[32 * 32];
  alignas(64) float facc[32 * 32];
  const int panels = static_cast<int>((t.ncols + kPanel - 1) / kPanel);
  for (int p = 0; p < panels; p += 2) {
    const int nb = std::min(2, panels - p);
    const int64_t n = t.n0 + p * kPanel;
    if (stream) {
      const uint8_t* b[2] = {t.w + (n / kPanel) * panel_bytes, t.w + (n / kPanel + nb - 1) * panel_bytes};
      amx_begin();
      if (nb == 2) {
        panel_block<2, true>(k, n, b, sums, facc);
      } else {
        panel_block<1, true>(k, n, b, sums, facc);
      }
      continue;
    }
    const uint8_t* b[2] = {unpacked.data(), unpacked.data() + unpacked_bytes};
    for (int j = 0; j < nb; ++j) {
      unpack_panel(t.w + (n / kPanel + j) * panel_bytes, t.kp, unpacked.data() + j * unpacked_bytes);
    }
    amx_begin();  // after the unpacking's stores (a barrier), before the tiles read them
    if (nb == 2) {
      panel_block<2, false>(k, n, b, sums, facc);
    } else {
      panel_block<1, false>(k, n, b, sums, facc);
    }
  }
}

}  // namespace

const Kernels& kernels_amx() {
  static const Kernels k{gemm_tile_amx};
  return k;
}

}  // namespace q4
}  // namespace pycompress
