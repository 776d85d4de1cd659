// AVX2 cols kernels of the sparse linears (sparse.h) over transposed
// activations, tile up to 32 rows (4 ymm) x 1 output channel: one broadcast
// weight (fp32) or 1x4 block (int8, vpmaddwd on zero-extended bytes: no
// saturation) times the channel's rows; 8 channels' sums are then stored
// through an 8 x 8 transposed tile (sparse_avx2.h).
#include <immintrin.h>

#include <cstring>

#include "common/vec_math_avx2.h"
#include "sparse/sparse_avx2.h"
#include "sparse/sparse_kernels.h"

namespace pycompress {
namespace sparse {
namespace {

// Up to 4 ymm (32 rows) per pass; fewer vectors get two accumulator sets.
template <int MV>
void f32_cols_pass(const F32Task& t, int64_t row0) {
  constexpr int S = MV <= 2 ? 2 : 1;
  const F32Weights& w = *t.w;
  const int64_t half_k = w.k / 2;
  const float* xt = t.xt + row0;
  alignas(32) float sums[8][MV * 8];  // 8 channels' row sums, stored as tiles of 8 x 8
  auto flush = [&](int64_t c0, int64_t channels) {
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) {
      f32_store_tile8(t, c0, channels, row0 + 8 * v, [&](int c) { return &sums[c][8 * v]; });
    }
  };
  for (int64_t n = t.n0; n < t.n1; ++n) {
    __m256 acc[S][MV];
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[s][v] = _mm256_setzero_ps();
    auto step = [&](int s, float wv, int64_t k) {
      const __m256 wb = _mm256_set1_ps(wv);
      const float* xr = xt + k * t.ldxt;
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[s][v] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(xr + 8 * v), acc[s][v]);
    };
    if (w.format == Format::Csr) {
      int64_t j = w.row_ptr[n];
      const int64_t j1 = w.row_ptr[n + 1];
      for (; j + S <= j1; j += S) {
#pragma GCC unroll 2
        for (int s = 0; s < S; ++s) step(s, w.values[j + s], w.col_idx[j + s]);
      }
      for (; j < j1; ++j) step(0, w.values[j], w.col_idx[j]);
    } else {
      const float* vals = w.values + n * half_k;
      const uint32_t* nm_row = w.nm_idx + n * w.nm_words;
      for (int64_t j = 0; j < half_k; ++j) step(static_cast<int>(j % S), vals[j], nm24_k(nm_row, j));
    }
    const int64_t slot = (n - t.n0) % 8;
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) {
      if (S == 2) acc[0][v] = _mm256_add_ps(acc[0][v], acc[S - 1][v]);
      _mm256_store_ps(&sums[slot][8 * v], acc[0][v]);
    }
    if (slot == 7 || n + 1 == t.n1) flush(n - slot, slot + 1);
  }
}

// 16 rows x 4 bytes of transposed activations times one 1x4 block: 4 vpmaddwd,
// each leaving (pair sum, pair sum) for 4 rows; folded per row at the end.
template <int MV>
void q8_cols_pass(const Q8Task& t, int64_t row0) {
  const Q8Weights& w = *t.w;
  const uint32_t* xt = t.xqt + row0;
  alignas(32) int32_t sums[8][MV * 16];  // 8 channels' int32 row sums, flushed as 8 x 8 tiles
  auto flush = [&](int64_t c0, int64_t channels) {
    for (int g = 0; g < 2 * MV && row0 + 8 * g < t.m; ++g) {
      q8_store_tile8(t, c0, channels, row0 + 8 * g,
                     [&](int c) { return reinterpret_cast<const float*>(&sums[c][8 * g]); });
    }
  };
  for (int64_t n = t.n0; n < t.n1; ++n) {
    __m256i acc[MV][4];
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v)
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[v][q] = _mm256_setzero_si256();
    for (int64_t b = w.row_ptr[n]; b < w.row_ptr[n + 1]; ++b) {
      int32_t w4;
      std::memcpy(&w4, w.values + 4 * b, sizeof w4);
      const __m256i wb = _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(w4)));
      const __m128i* xr = reinterpret_cast<const __m128i*>(xt + static_cast<int64_t>(w.blk_idx[b]) * t.ldxt);
#pragma GCC unroll 2
      for (int v = 0; v < MV; ++v)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          const __m256i x16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(xr + 4 * v + q));
          acc[v][q] = _mm256_add_epi32(acc[v][q], _mm256_madd_epi16(x16, wb));
        }
    }
    const int64_t slot = (n - t.n0) % 8;
#pragma GCC unroll 2
    for (int v = 0; v < MV; ++v)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        // hadd gives rows [0,1,4,5 | 2,3,6,7]; the permute restores 0..7.
        const __m256i rows8 = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[v][2 * h], acc[v][2 * h + 1]), 0xD8);
        _mm256_store_si256(reinterpret_cast<__m256i*>(&sums[slot][16 * v + 8 * h]), rows8);
      }
    if (slot == 7 || n + 1 == t.n1) flush(n - slot, slot + 1);
  }
}

}  // namespace

void f32_cols_avx2(const F32Task& t) {
  for (int64_t row0 = 0; row0 < t.m; row0 += 32) {
    switch ((t.m - row0 + 7) / 8) {
      case 1: f32_cols_pass<1>(t, row0); break;
      case 2: f32_cols_pass<2>(t, row0); break;
      case 3: f32_cols_pass<3>(t, row0); break;
      default: f32_cols_pass<4>(t, row0); break;
    }
  }
}

void q8_cols_avx2(const Q8Task& t) {
  for (int64_t row0 = 0; row0 < t.m; row0 += 32) {
    if (t.m - row0 > 16) q8_cols_pass<2>(t, row0); else q8_cols_pass<1>(t, row0);
  }
}

}  // namespace sparse
}  // namespace pycompress
