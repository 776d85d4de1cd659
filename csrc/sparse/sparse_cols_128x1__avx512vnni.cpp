// AVX-512 cols kernels of the sparse linears (sparse.h) over transposed
// activations, tile up to 128 rows (8 zmm) x 1 output channel: one broadcast
// weight (fp32) or 1x4 block (int8, vpdpbusd) times the channel's rows; fewer
// than 3 row vectors get extra accumulator sets so the FMA / vpdpbusd latency
// never limits the call. 16 channels' sums are stored through a 16 x 16
// transposed tile (sparse_avx512.h).
#include <immintrin.h>

#include <cstring>

#include "common/vec_math_avx512.h"
#include "sparse/sparse_avx512.h"
#include "sparse/sparse_kernels.h"

namespace pycompress {
namespace sparse {
namespace {

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

}  // namespace

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

}  // namespace sparse
}  // namespace pycompress
