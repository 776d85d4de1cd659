// AVX-512 cols kernels over the csr and bsr1x4 panel layouts (sparse.h), tile
// up to 32 rows (kPanelBlockRows, 2 zmm) x 1 output channel, per panel
// segment; each channel's partial sums wait in a per-thread scratch between
// panels (sparse_panels.h).
#include <immintrin.h>

#include <cstring>

#include "common/vec_math_avx512.h"
#include "sparse/sparse_avx512.h"
#include "sparse/sparse_kernels.h"
#include "sparse/sparse_panels.h"

namespace pycompress {
namespace sparse {
namespace {

// One run of csr panel entries [j, j1) into out (MV vectors of 16 rows). The
// x^T row stride is the constant 16 * MV (the driver's ld for MV vectors), the
// four indices of a group come from one 8-byte load and the four weights from
// one 16-byte load broadcast in registers: fewer load-port operations than a
// load per index and per weight, which matters once x^T is in L1.
template <int MV>
inline void f32_panel_run(const float* xt, const float* vals, const uint16_t* idx, int64_t j, int64_t j1,
                          __m512* out) {
  constexpr int S = acc_sets<MV>();
  constexpr int64_t ldxt = 16 * MV;
  __m512 acc[S][MV];
#pragma GCC unroll 8
  for (int v = 0; v < MV; ++v) {
    acc[0][v] = out[v];
#pragma GCC unroll 4
    for (int s = 1; s < S; ++s) acc[s][v] = _mm512_setzero_ps();
  }
  auto fma = [&](int s, __m512 wb, uint64_t k) {
    const float* xr = xt + static_cast<int64_t>(k) * ldxt;
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) acc[s][v] = _mm512_fmadd_ps(wb, _mm512_load_ps(xr + 16 * v), acc[s][v]);
  };
  for (; j + 4 <= j1; j += 4) {
    uint64_t ks;
    std::memcpy(&ks, idx + j, sizeof ks);
    const __m128 w4 = _mm_loadu_ps(vals + j);
    fma(0, _mm512_broadcastss_ps(w4), ks & 0xFFFFu);
    fma(1 % S, _mm512_broadcastss_ps(_mm_movehdup_ps(w4)), (ks >> 16) & 0xFFFFu);
    fma(2 % S, _mm512_broadcastss_ps(_mm_movehl_ps(w4, w4)), (ks >> 32) & 0xFFFFu);
    fma(3 % S, _mm512_broadcastss_ps(_mm_shuffle_ps(w4, w4, 3)), ks >> 48);
  }
  for (; j < j1; ++j) fma(0, _mm512_set1_ps(vals[j]), idx[j]);
#pragma GCC unroll 8
  for (int v = 0; v < MV; ++v) {
#pragma GCC unroll 4
    for (int s = 1; s < S; ++s) acc[0][v] = _mm512_add_ps(acc[0][v], acc[s][v]);
    out[v] = acc[0][v];
  }
}

// Both AVX-512 cols kernels over a panel layout: panels_loop (sparse_panels.h)
// with each channel's partial sums as MV zmm (up to kPanelBlockRows = 32 rows;
// raw 32-bit lanes: float or int32). `run(j0, j1, sums)` adds segment [j0, j1)
// of a channel to its MV vectors of sums; `store(c0, channels, v, lanes)` runs
// the epilogue of 16 channels' vector v after the last panel, lanes(c)
// pointing at channel c's.
template <int MV, class Run, class Store>
void cols_panels_loop(int64_t n0, int64_t n1, int64_t n, int64_t panels, const int32_t* sub_all, Run&& run,
                      Store&& store) {
  panels_loop<MV * 16, 16, 16>(
      n0, n1, n, panels, sub_all,
      [&](uint32_t* pr, int32_t j0, int32_t j1, bool first) {
        __m512i sums[MV];
#pragma GCC unroll 2
        for (int v = 0; v < MV; ++v) sums[v] = first ? _mm512_setzero_si512() : _mm512_load_si512(pr + 16 * v);
        run(j0, j1, sums);
#pragma GCC unroll 2
        for (int v = 0; v < MV; ++v) _mm512_store_si512(pr + 16 * v, sums[v]);
      },
      [&](int64_t c0, int64_t channels, auto part_of) {
#pragma GCC unroll 2
        for (int v = 0; v < MV; ++v) store(c0, channels, 16 * v, [&](int c) { return part_of(c) + 16 * v; });
      });
}

template <int MV>
void f32_cols_panels_mv(const F32Task& t) {
  const CsrPanels& pn = *t.w->panels;
  cols_panels_loop<MV>(
      t.n0, t.n1, t.w->n, csr_panels_count(t.w->k), pn.sub,
      [&](int32_t j0, int32_t j1, __m512i* sums) {
        __m512 out[MV];
#pragma GCC unroll 2
        for (int v = 0; v < MV; ++v) out[v] = _mm512_castsi512_ps(sums[v]);
        f32_panel_run<MV>(t.xt, pn.values, pn.idx, j0, j1, out);
#pragma GCC unroll 2
        for (int v = 0; v < MV; ++v) sums[v] = _mm512_castps_si512(out[v]);
      },
      [&](int64_t c0, int64_t channels, int64_t row0, auto lanes) {
        f32_store_tile(t, c0, channels, row0, [&](int c) { return reinterpret_cast<const float*>(lanes(c)); });
      });
}

// One run of bsr1x4 panel entries [j, j1) (a multiple of 4) into out (MV
// vectors of 16 rows), x^T row stride the constant 16 * MV groups; the four
// blocks of a group of entries come from one 16-byte load.
template <int MV>
inline void q8_panel_run(const uint32_t* xt, const int8_t* vals, const uint16_t* idx, int64_t j, int64_t j1,
                         __m512i* out) {
  constexpr int S = acc_sets<MV>();
  constexpr int64_t ldxt = 16 * MV;
  __m512i acc[S][MV];
#pragma GCC unroll 2
  for (int v = 0; v < MV; ++v) {
    acc[0][v] = out[v];
#pragma GCC unroll 4
    for (int s = 1; s < S; ++s) acc[s][v] = _mm512_setzero_si512();
  }
  auto dot = [&](int s, __m512i wb, uint64_t g) {
    const uint32_t* xr = xt + static_cast<int64_t>(g) * ldxt;
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v) acc[s][v] = _mm512_dpbusd_epi32(acc[s][v], _mm512_load_si512(xr + 16 * v), wb);
  };
  for (; j < j1; j += 4) {
    uint64_t gs;
    std::memcpy(&gs, idx + j, sizeof gs);
    const __m128i w4 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vals + 4 * j));
    dot(0, _mm512_broadcastd_epi32(w4), gs & 0xFFFFu);
    dot(1 % S, _mm512_broadcastd_epi32(_mm_shuffle_epi32(w4, 1)), (gs >> 16) & 0xFFFFu);
    dot(2 % S, _mm512_broadcastd_epi32(_mm_shuffle_epi32(w4, 2)), (gs >> 32) & 0xFFFFu);
    dot(3 % S, _mm512_broadcastd_epi32(_mm_shuffle_epi32(w4, 3)), gs >> 48);
  }
#pragma GCC unroll 2
  for (int v = 0; v < MV; ++v) {
#pragma GCC unroll 4
    for (int s = 1; s < S; ++s) acc[0][v] = _mm512_add_epi32(acc[0][v], acc[s][v]);
    out[v] = acc[0][v];
  }
}

// Cols kernel over bsr1x4 panels: the panel loop with int32 partial sums.
template <int MV>
void q8_cols_panels_mv(const Q8Task& t) {
  const Bsr1x4Panels& pn = *t.w->panels;
  cols_panels_loop<MV>(
      t.n0, t.n1, t.w->n, csr_panels_count(t.w->kp / 4), pn.sub,
      [&](int32_t j0, int32_t j1, __m512i* sums) { q8_panel_run<MV>(t.xqt, pn.values, pn.idx, j0, j1, sums); },
      [&](int64_t c0, int64_t channels, int64_t row0, auto lanes) {
        q8_store_tile(t, c0, channels, row0, [&](int c) { return reinterpret_cast<const float*>(lanes(c)); });
      });
}

}  // namespace

void f32_cols_panels_avx512(const F32Task& t) {
  static_assert(kPanelBlockRows == 32, "the driver hands this kernel at most 2 zmm of rows");
  if (t.m <= 16) return f32_cols_panels_mv<1>(t);
  return f32_cols_panels_mv<2>(t);
}

void q8_cols_panels_avx512(const Q8Task& t) {
  static_assert(kPanelBlockRows == 32, "the driver hands this kernel at most 2 zmm of rows");
  if (t.m <= 16) return q8_cols_panels_mv<1>(t);
  return q8_cols_panels_mv<2>(t);
}

}  // namespace sparse
}  // namespace pycompress
