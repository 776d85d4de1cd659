// AVX-512 VNNI path: vpdpbusd (u8 x s8 -> s32, 4-wide dot products) accumulates
// in int32 directly, so nothing saturates. Microkernel: up to 6 rows x 64
// columns (4 zmm panels), 24 accumulators + 4 weight registers + 1 broadcast.
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/vec_math_avx512.h"
#include "q8/q8_epilogue_avx512.h"
#include "q8/q8_gemm.h"

namespace pycompress {
namespace q8 {
namespace {

constexpr int kMR = 6;
constexpr int kMaxNV = 4;


// One row's range (and the NaN/Inf probe: v - v is 0 unless v is NaN or Inf)
// in four independent chains of 16 floats: a single chain would wait on the
// min/max latency every 16 values. min, max and the probe's sum are exact in
// any order, so the result is the scalar spec's.
inline void row_range(const float* x, int64_t k, float* lo, float* hi, float* probe) {
  __m512 vlo[4], vhi[4], pr[4];
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u) vlo[u] = vhi[u] = pr[u] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512 v = _mm512_loadu_ps(x + i + 16 * u);
      pr[u] = _mm512_add_ps(pr[u], _mm512_sub_ps(v, v));
      vlo[u] = _mm512_min_ps(vlo[u], v);
      vhi[u] = _mm512_max_ps(vhi[u], v);
    }
  }
  for (; i < k; i += 16) {  // masked-off lanes load 0, which every range holds already
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask16(k - i), x + i);
    pr[0] = _mm512_add_ps(pr[0], _mm512_sub_ps(v, v));
    vlo[0] = _mm512_min_ps(vlo[0], v);
    vhi[0] = _mm512_max_ps(vhi[0], v);
  }
  *lo = _mm512_reduce_min_ps(_mm512_min_ps(_mm512_min_ps(vlo[0], vlo[1]), _mm512_min_ps(vlo[2], vlo[3])));
  *hi = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(vhi[0], vhi[1]), _mm512_max_ps(vhi[2], vhi[3])));
  *probe = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(pr[0], pr[1]), _mm512_add_ps(pr[2], pr[3])));
}

// q[0, len) = the quantized x[0, len).
inline void quantize_run(const float* x, int64_t len, uint8_t* q, float inv_scale, int32_t zp, int32_t qmax) {
  const __m512 vinv = _mm512_set1_ps(inv_scale);
  const __m512 vmin = _mm512_set1_ps(-256.0f), vmax = _mm512_set1_ps(256.0f);
  const __m512i vzp = _mm512_set1_epi32(zp);
  // round(x / scale) + zp before the [0, 255] clamp; the +-256 pre-clamp keeps
  // the conversion in range, so the sum lies in [-256, 511].
  auto quantize16 = [&](__m512 v) {
    v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, vinv), vmin), vmax);
    return _mm512_add_epi32(_mm512_cvtps_epi32(v), vzp);
  };
  int64_t k = 0;
  // 64 values per step: the saturating packs (int32 -> int16 exact for
  // [-256, 511], int16 -> uint8 saturating = the [0, 255] clamp) replace the
  // integer clamp and four narrowing stores; they interleave 128-bit lanes,
  // which one vpermd puts back in order.
  const __m512i lane_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512i vqmax8 = _mm512_set1_epi8(static_cast<char>(qmax));  // then a byte min clamps to qmax
  for (; k + 64 <= len; k += 64) {
    const __m512i a = quantize16(_mm512_loadu_ps(x + k));
    const __m512i b = quantize16(_mm512_loadu_ps(x + k + 16));
    const __m512i c = quantize16(_mm512_loadu_ps(x + k + 32));
    const __m512i d = quantize16(_mm512_loadu_ps(x + k + 48));
    const __m512i bytes =
        _mm512_min_epu8(_mm512_packus_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d)), vqmax8);
    _mm512_storeu_si512(q + k, _mm512_permutexvar_epi32(lane_order, bytes));
  }
  const __m512i q0 = _mm512_setzero_si512(), vqmax = _mm512_set1_epi32(qmax);
  for (; k < len; k += 16) {
    const __mmask16 in = tail_mask16(len - k);
    __m512i qi = quantize16(_mm512_maskz_loadu_ps(in, x + k));
    qi = _mm512_min_epi32(_mm512_max_epi32(qi, q0), vqmax);
    _mm_mask_storeu_epi8(q + k, in, _mm512_cvtepi32_epi8(qi));
  }
}

void quantize_rows_avx512(const QuantizeRows& p) { quantize_rows_with(p, row_range, quantize_run); }

// The sums of rows [r0, r0 + MR) over k groups [g0, g1) of the tile's panels,
// added to `part` (MR x NV x 16 int32, the sums of the groups before g0) when
// g0 > 0; stored back to `part` unless g1 is the last group, where the
// epilogue writes the outputs instead.
template <int MR, int NV>
void tile_rows(const GemmTile& t, int64_t r0, int64_t g0, int64_t g1, int32_t* part) {
  const int64_t groups = t.kp / kKGroup;
  const int64_t panel_bytes = t.kp * kPanel;
  const int8_t* w = t.w + (t.n0 / kPanel) * panel_bytes;
  const uint8_t* a = t.a + r0 * t.lda;

  __m512i acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = g0 > 0 ? _mm512_loadu_si512(part + (r * NV + v) * 16) : _mm512_setzero_si512();

  int64_t g = g0;
  if constexpr (MR == 1) {
    // One row (decode / GEMV): a second set of accumulators for odd k-groups
    // halves the vpdpbusd dependency chain; integer sums are exact in any order.
    __m512i odd[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) odd[v] = _mm512_setzero_si512();
    for (; g + 2 <= g1; g += 2) {
      int32_t a0, a1;  // each broadcast straight from memory (a load, not an ALU op)
      std::memcpy(&a0, a + g * kKGroup, 4);
      std::memcpy(&a1, a + g * kKGroup + 4, 4);
      const __m512i ab0 = _mm512_set1_epi32(a0), ab1 = _mm512_set1_epi32(a1);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        acc[0][v] = _mm512_dpbusd_epi32(acc[0][v], ab0, _mm512_loadu_si512(w + v * panel_bytes + g * 64));
        odd[v] = _mm512_dpbusd_epi32(odd[v], ab1, _mm512_loadu_si512(w + v * panel_bytes + g * 64 + 64));
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[0][v] = _mm512_add_epi32(acc[0][v], odd[v]);
  }
  for (; g < g1; ++g) {
    __m512i wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(w + v * panel_bytes + g * 64);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * t.lda + g * kKGroup, sizeof a4);
      const __m512i ab = _mm512_set1_epi32(a4);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], ab, wv[v]);
    }
  }

  if (g1 < groups) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm512_storeu_si512(part + (r * NV + v) * 16, acc[r][v]);
    return;
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const PanelEpilogue epilogue(t, t.n0 + v * kPanel);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) epilogue.store(r0 + r, acc[r][v]);
  }
}

template <int MR>
void tile_rows_nv(const GemmTile& t, int64_t r0, int nv, int64_t g0, int64_t g1, int32_t* part) {
  switch (nv) {
    case 1: return tile_rows<MR, 1>(t, r0, g0, g1, part);
    case 2: return tile_rows<MR, 2>(t, r0, g0, g1, part);
    case 3: return tile_rows<MR, 3>(t, r0, g0, g1, part);
    default: return tile_rows<MR, kMaxNV>(t, r0, g0, g1, part);
  }
}

// K blocking: a tile of several row blocks takes its k groups kKcGroups at a
// time (4 panels x 256 k: 16 KiB of weights, inside L1) through every
// row block before the next ones, the partial sums kept in a per-thread buffer;
// otherwise each row block streams the tile's whole panels (256 KiB at
// K = 4096) from L2 again.
constexpr int64_t kKcGroups = 64;

void gemm_tile_avx512(const GemmTile& t) {
  const int nv = static_cast<int>((t.ncols + kPanel - 1) / kPanel);
  // Rows go 6 at a time; a remainder of 1 to 3 rows would reuse each weight
  // load only that often, so the last rows go 5 at a time instead (m = 6a + 5b:
  // 128 rows as 18 x 6 + 4 x 5, not 21 x 6 + 2). Each row's numbers do not
  // depend on its group.
  const int64_t rem = t.m % kMR;
  const int64_t fives = rem >= 1 && rem <= 3 && 5 * (kMR - rem) <= t.m ? kMR - rem : 0;
  const int64_t sixes_end = t.m - 5 * fives;
  const int64_t groups = t.kp / kKGroup;
  // One row block reads each weight once: no K blocking.
  const int64_t kc = t.m > kMR ? kKcGroups : groups;
  thread_local std::vector<int32_t> parts;
  const size_t part_size = static_cast<size_t>(t.m) * kMaxNV * 16;
  if (kc < groups && parts.size() < part_size) parts.resize(part_size);
  for (int64_t g0 = 0; g0 < groups; g0 += kc) {
    const int64_t g1 = std::min(groups, g0 + kc);
    auto rows = [&](auto mr, int64_t r0) {
      constexpr int MR = decltype(mr)::value;
      tile_rows_nv<MR>(t, r0, nv, g0, g1, kc < groups ? parts.data() + r0 * kMaxNV * 16 : nullptr);
    };
    int64_t r0 = 0;
    for (; r0 + kMR <= sixes_end; r0 += kMR) rows(std::integral_constant<int, kMR>{}, r0);
    for (; r0 + 5 <= t.m && fives > 0; r0 += 5) rows(std::integral_constant<int, 5>{}, r0);
    switch (t.m - r0) {
      case 5: rows(std::integral_constant<int, 5>{}, r0); break;
      case 4: rows(std::integral_constant<int, 4>{}, r0); break;
      case 3: rows(std::integral_constant<int, 3>{}, r0); break;
      case 2: rows(std::integral_constant<int, 2>{}, r0); break;
      case 1: rows(std::integral_constant<int, 1>{}, r0); break;
      default: break;
    }
  }
}

}  // namespace

const Kernels& kernels_avx512vnni() {
  static const Kernels k{quantize_rows_avx512, gemm_tile_avx512};
  return k;
}

}  // namespace q8
}  // namespace pycompress
