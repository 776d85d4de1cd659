// AVX-512 (VNNI) path of the sparse linears (see sparse.h for formats and
// the rows / cols kernel split).
//   rows: int8: 16 1x4 blocks per vpgatherdd (uint16 indices widened once per
//         16), two accumulator sets per row so the dot-product latency chain
//         never limits a single-row (decode) call; fp32: the AVX2 kernel (see
//         kernels_avx512vnni()).
//   cols: one broadcast weight (or 1x4 block) times up to 8 zmm of rows; fewer
//         than 3 row vectors get extra accumulator sets for the same reason.
#include <immintrin.h>

#include <cstring>

#include "common/vec_math_avx512.h"
#include "sparse/sparse.h"
#include "sparse/sparse_epilogue.h"
#include "sparse/sparse_avx512.h"
#include "sparse/sparse_panels.h"

namespace pycompress {
namespace sparse {
namespace {

// In-register 16 x 16 transpose: r[i] lane j becomes r[j] lane i.
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: a0 b0 a1 b1 | a2 b2 a3 b3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane L: element 4L + j of rows 4i..4i+3 in r[4i + j]
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  __m512 o[16];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {  // gather lane L of r[j], r[4+j], r[8+j], r[12+j] into row 4L + j
    const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), u3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    o[j] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    o[8 + j] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    o[4 + j] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    o[12 + j] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = o[i];
}

// Epilogue of `channels` (<= 16) consecutive output channels from n0 for the
// 16 rows from row0: col(c) points at channel c's 16 row sums. The tile is
// transposed in registers so y gets one contiguous (masked) row store per
// row, and bias is one vector load: a store per channel and row into a y
// whose row stride is a power of two hits one L1 set and missed on nearly
// every store (K=N=4096, M=16: ~40% of the call).
template <typename Col>
inline void f32_store_tile(const F32Task& t, int64_t n0, int64_t channels, int64_t row0, Col col) {
  __m512 r[16];
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c) r[c] = c < channels ? _mm512_load_ps(col(c)) : _mm512_setzero_ps();
  transpose16x16(r);
  const __mmask16 lanes = tail_mask(channels);
  const __m512 bias = t.bias != nullptr ? _mm512_maskz_loadu_ps(lanes, t.bias + n0) : _mm512_setzero_ps();
  const int64_t rows = t.m - row0 < 16 ? t.m - row0 : 16;
  for (int64_t i = 0; i < rows; ++i) {
    __m512 y = r[i];
    if (t.bias != nullptr) y = _mm512_add_ps(y, bias);
    y = apply_activation_avx512(y, t.act);
    _mm512_mask_storeu_ps(t.y + (row0 + i) * t.ldy + n0, lanes, y);
  }
}

// Epilogue of `channels` (<= 16) consecutive channels from n0 for the 16 rows
// from row0 (col(c): channel c's 16 int32 row sums), transposed in registers
// so y (or raw) gets one contiguous masked store per row; per lane the same
// IEEE operations as q8_epilogue.
template <typename Col>
inline void q8_store_tile(const Q8Task& t, int64_t n0, int64_t channels, int64_t row0, Col col) {
  __m512 r[16];
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c) r[c] = c < channels ? _mm512_load_ps(col(c)) : _mm512_setzero_ps();
  transpose16x16(r);
  const __mmask16 lanes = tail_mask(channels);
  const int64_t rows = t.m - row0 < 16 ? t.m - row0 : 16;
  if (t.raw != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      _mm512_mask_storeu_epi32(t.raw + (row0 + i) * t.ldraw + n0, lanes, _mm512_castps_si512(r[i]));
    }
    return;
  }
  const __m512i col_sum = _mm512_maskz_loadu_epi32(lanes, t.w->col_sum + n0);
  const __m512 w_scale = _mm512_maskz_loadu_ps(lanes, t.w->w_scale + n0);
  const __m512 bias = t.bias != nullptr ? _mm512_maskz_loadu_ps(lanes, t.bias + n0) : _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = row0 + i;
    _mm512_mask_storeu_ps(t.y + row * t.ldy + n0, lanes,
                          q8_epilogue_avx512(t, row, _mm512_castps_si512(r[i]), col_sum, w_scale, bias));
  }
}

// Independent accumulator sets so the FMA latency (4 cycles) is covered.
template <int MV>
constexpr int acc_sets() {
  return MV == 1 ? 4 : (MV == 2 ? 2 : 1);
}

// Channels of the cols kernels are finished 16 at a time: their row sums wait
// in this tile for the transposed-tile epilogue.
template <int MV>
struct ColsTile {
  alignas(64) float v[16][MV * 16];
};

template <int MV>
void f32_cols_mv(const F32Task& t) {
  constexpr int S = acc_sets<MV>();
  const F32Weights& w = *t.w;
  const int64_t half_k = w.k / 2;
  ColsTile<MV> tile;
  auto flush = [&](int64_t c0, int64_t channels) {
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) {
      f32_store_tile(t, c0, channels, 16 * v, [&](int c) { return &tile.v[c][16 * v]; });
    }
  };
  for (int64_t n = t.n0; n < t.n1; ++n) {
    __m512 acc[S][MV];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
      for (int v = 0; v < MV; ++v) acc[s][v] = _mm512_setzero_ps();
    auto step = [&](int s, float wv, int64_t k) {
      const __m512 wb = _mm512_set1_ps(wv);
      const float* xr = t.xt + k * t.ldxt;
#pragma GCC unroll 8
      for (int v = 0; v < MV; ++v) acc[s][v] = _mm512_fmadd_ps(wb, _mm512_load_ps(xr + 16 * v), acc[s][v]);
    };
    if (w.format == Format::Csr) {
      int64_t j = w.row_ptr[n];
      const int64_t j1 = w.row_ptr[n + 1];
      for (; j + S <= j1; j += S) {
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) step(s, w.values[j + s], w.col_idx[j + s]);
      }
      for (int s = 0; j < j1; ++j, ++s) step(s, w.values[j], w.col_idx[j]);
    } else {
      const float* vals = w.values + n * half_k;
      const uint32_t* nm_row = w.nm_idx + n * w.nm_words;
      for (int64_t j = 0; j < half_k; j += 16) {
        uint32_t bits = nm_row[j >> 4];
        const int64_t cnt = half_k - j < 16 ? half_k - j : 16;
        for (int64_t i = 0; i < cnt; ++i, bits >>= 2) {
          step(static_cast<int>(i % S), vals[j + i], 4 * ((j + i) >> 1) + (bits & 3u));
        }
      }
    }
    const int64_t c = (n - t.n0) % 16;
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) {
#pragma GCC unroll 4
      for (int s = 1; s < S; ++s) acc[0][v] = _mm512_add_ps(acc[0][v], acc[s][v]);
      _mm512_store_ps(&tile.v[c][16 * v], acc[0][v]);
    }
    if (c == 15 || n + 1 == t.n1) flush(n - c, c + 1);
  }
}

void f32_cols_avx512(const F32Task& t) {
  switch ((t.m + 15) / 16) {
    case 1: return f32_cols_mv<1>(t);
    case 2: return f32_cols_mv<2>(t);
    case 3: return f32_cols_mv<3>(t);
    case 4: return f32_cols_mv<4>(t);
    case 5: return f32_cols_mv<5>(t);
    case 6: return f32_cols_mv<6>(t);
    case 7: return f32_cols_mv<7>(t);
    default: return f32_cols_mv<8>(t);
  }
}

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

void f32_cols_panels_avx512(const F32Task& t) {
  static_assert(kPanelBlockRows == 32, "the driver hands this kernel at most 2 zmm of rows");
  if (t.m <= 16) return f32_cols_panels_mv<1>(t);
  return f32_cols_panels_mv<2>(t);
}

template <int MR>
void q8_rows_mr(const Q8Task& t, int64_t r0) {
  const Q8Weights& w = *t.w;
  for (int64_t n = t.n0; n < t.n1; ++n) {
    __m512i acc[MR][2];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    const int64_t b1 = w.row_ptr[n + 1];
    int s = 0;
    for (int64_t b = w.row_ptr[n]; b < b1; b += 16, s ^= 1) {
      const __mmask16 mask = tail_mask(b1 - b);
      const __m512i idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, w.blk_idx + b));
      const __m512i wv = _mm512_maskz_loadu_epi32(mask, w.values + 4 * b);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m512i xv =
            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, idx, t.xq + (r0 + r) * w.kp, 4);
        acc[r][s] = _mm512_dpbusd_epi32(acc[r][s], xv, wv);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      q8_store_scalar(t, r0 + r, n, _mm512_reduce_add_epi32(_mm512_add_epi32(acc[r][0], acc[r][1])));
    }
  }
}

void q8_rows_avx512(const Q8Task& t) {
  int64_t r = 0;
  for (; r + 3 <= t.m; r += 3) q8_rows_mr<3>(t, r);
  switch (t.m - r) {
    case 2: return q8_rows_mr<2>(t, r);
    case 1: return q8_rows_mr<1>(t, r);
    default: return;
  }
}

template <int MV>
void q8_cols_mv(const Q8Task& t) {
  constexpr int S = acc_sets<MV>();
  const Q8Weights& w = *t.w;
  ColsTile<MV> tile;  // int32 row sums, moved as raw bits
  auto flush = [&](int64_t c0, int64_t channels) {
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) {
      q8_store_tile(t, c0, channels, 16 * v, [&](int c) { return &tile.v[c][16 * v]; });
    }
  };
  for (int64_t n = t.n0; n < t.n1; ++n) {
    __m512i acc[S][MV];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
      for (int v = 0; v < MV; ++v) acc[s][v] = _mm512_setzero_si512();
    auto step = [&](int s, int64_t b) {
      int32_t w4;
      std::memcpy(&w4, w.values + 4 * b, sizeof w4);
      const __m512i wb = _mm512_set1_epi32(w4);
      const uint32_t* xr = t.xqt + static_cast<int64_t>(w.blk_idx[b]) * t.ldxt;
#pragma GCC unroll 8
      for (int v = 0; v < MV; ++v) acc[s][v] = _mm512_dpbusd_epi32(acc[s][v], _mm512_load_si512(xr + 16 * v), wb);
    };
    int64_t b = w.row_ptr[n];
    const int64_t b1 = w.row_ptr[n + 1];
    for (; b + S <= b1; b += S) {
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s) step(s, b + s);
    }
    for (int s = 0; b < b1; ++b, ++s) step(s, b);

    const int64_t c = (n - t.n0) % 16;
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) {
#pragma GCC unroll 4
      for (int s = 1; s < S; ++s) acc[0][v] = _mm512_add_epi32(acc[0][v], acc[s][v]);
      _mm512_store_si512(&tile.v[c][16 * v], acc[0][v]);
    }
    if (c == 15 || n + 1 == t.n1) flush(n - c, c + 1);
  }
}

void q8_cols_avx512(const Q8Task& t) {
  switch ((t.m + 15) / 16) {
    case 1: return q8_cols_mv<1>(t);
    case 2: return q8_cols_mv<2>(t);
    case 3: return q8_cols_mv<3>(t);
    case 4: return q8_cols_mv<4>(t);
    case 5: return q8_cols_mv<5>(t);
    case 6: return q8_cols_mv<6>(t);
    case 7: return q8_cols_mv<7>(t);
    default: return q8_cols_mv<8>(t);
  }
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

void q8_cols_panels_avx512(const Q8Task& t) {
  static_assert(kPanelBlockRows == 32, "the driver hands this kernel at most 2 zmm of rows");
  if (t.m <= 16) return q8_cols_panels_mv<1>(t);
  return q8_cols_panels_mv<2>(t);
}

// Sliced layout (sparse.h): per step one weight zmm (16 channels x one 1x4
// block), the 16 window offsets unpacked by a qword broadcast + vpsrlvd, and
// per row one unaligned 64-byte window load, one vpermd, one vpdpbusd.
void q8_sliced_avx512(const SlicedTask& t) {
  const SlicedWeights& w = *t.w;
  const __m512i shifts = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  sliced_blocks(t, [&](auto mr, int64_t s, int64_t r0) {
    constexpr int MR = decltype(mr)::value;
    sliced_rows<MR>(t, s, r0, [&](__m512i* acc, int64_t j) {
      const __m512i wv = _mm512_loadu_si512(w.values + 64 * j);
      int64_t lanes;
      std::memcpy(&lanes, w.step_lane + 2 * j, sizeof lanes);
      const __m512i idx = _mm512_srlv_epi32(_mm512_set1_epi64(lanes), shifts);
      const uint8_t* xw = t.xq + 4 * static_cast<int64_t>(w.step_base[j]) + r0 * t.ldq;
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512i xv = _mm512_permutexvar_epi32(idx, _mm512_loadu_si512(xw + r * t.ldq));
        acc[r] = _mm512_dpbusd_epi32(acc[r], xv, wv);
      }
    });
  });
}

}  // namespace

const Kernels& kernels_avx512vnni() {
  // fp32 rows (M < 4) use the AVX2 kernel: on Zen 4 two 8-lane vgatherdps
  // beat one 16-lane gather (4096x4096 csr at 90%, M=1: 626 vs 815 us on one
  // thread, 341 vs 440 us on two). The 16-lane int8 gather wins (726 vs
  // 1001 us): each gathered dword carries a whole 1x4 block.
  static const Kernels k{kernels_avx2().f32_rows, f32_cols_avx512, f32_cols_panels_avx512,
                         f32_cols_panels_narrow_s4, q8_rows_avx512, q8_cols_avx512, q8_cols_panels_avx512,
                         q8_sliced_avx512, kernels_scalar().q8_sliced_bytes};
  return k;
}

}  // namespace sparse
}  // namespace pycompress
