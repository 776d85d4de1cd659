// AVX2 path of the sparse linears (see sparse.h). Same kernel shapes as the
// AVX-512 path with 8-lane vectors. int8 products use vpmaddwd on zero-extended
// activations and sign-extended weights (two exact u8*s8 products per int32
// lane): vpmaddubsw would saturate its int16 pair sums (255*127*2 > 32767) and
// make the result depend on the CPU.
#include <immintrin.h>

#include <cstring>

#include "common/vec_math_avx2.h"
#include "sparse/sparse.h"
#include "sparse/sparse_epilogue.h"
#include "sparse/sparse_panels.h"

namespace pycompress {
namespace sparse {
namespace {

inline float hsum_ps(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

inline int32_t hsum_epi32(__m256i v) {
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  uint32_t s = 0;  // wrapping sum: exact whenever the true sum fits int32
  for (int i = 0; i < 8; ++i) s += static_cast<uint32_t>(t[i]);
  return static_cast<int32_t>(s);
}

void f32_rows_avx2(const F32Task& t) {
  const F32Weights& w = *t.w;
  const int64_t half_k = w.k / 2;
  for (int64_t r = 0; r < t.m; ++r) {
    const float* x = t.x + r * t.ldx;
    for (int64_t n = t.n0; n < t.n1; ++n) {
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      float tail = 0.0f;
      if (w.format == Format::Csr) {
        int64_t j = w.row_ptr[n];
        const int64_t j1 = w.row_ptr[n + 1];
        for (; j + 16 <= j1; j += 16) {
          const __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.col_idx + j)));
          const __m256i i1 =
              _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.col_idx + j + 8)));
          acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.values + j), _mm256_i32gather_ps(x, i0, 4), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w.values + j + 8), _mm256_i32gather_ps(x, i1, 4), acc1);
        }
        for (; j < j1; ++j) tail = tail + w.values[j] * x[w.col_idx[j]];
      } else {
        const float* vals = w.values + n * half_k;
        const uint32_t* nm_row = w.nm_idx + n * w.nm_words;
        const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
        const __m256i three = _mm256_set1_epi32(3);
        int64_t j = 0;
        for (; j + 16 <= half_k; j += 16) {
          const __m256i bits = _mm256_set1_epi32(static_cast<int>(nm_row[j >> 4]));
          const __m256i i0 = _mm256_add_epi32(_mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(bits, shifts), three), base),
                                              _mm256_set1_epi32(static_cast<int>(2 * j)));
          const __m256i hi = _mm256_srli_epi32(bits, 16);
          const __m256i i1 = _mm256_add_epi32(_mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(hi, shifts), three), base),
                                              _mm256_set1_epi32(static_cast<int>(2 * j + 16)));
          acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + j), _mm256_i32gather_ps(x, i0, 4), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + j + 8), _mm256_i32gather_ps(x, i1, 4), acc1);
        }
        for (; j < half_k; ++j) tail = tail + vals[j] * x[nm24_k(nm_row, j)];
      }
      const float sum = hsum_ps(_mm256_add_ps(acc0, acc1)) + tail;
      t.y[r * t.ldy + n] = f32_epilogue(sum, t.bias, n, t.act);
    }
  }
}



inline void transpose8x8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 2; ++i) {
    for (int h = 0; h < 2; ++h) {
      const __m256 a = t[4 * i + h], b = t[4 * i + 2 + h];
      u[4 * i + 2 * h] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * i + 2 * h + 1] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2));
    }
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

inline __m256i lanes_mask(int64_t valid) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(valid)), index);
}

// Epilogue of `channels` (<= 8) consecutive output channels from n0 for the 8
// rows from row0 (col(c): channel c's 8 row sums): transposed in registers so
// y gets one contiguous masked store per row and bias is one vector load (a
// store per channel and row into a y whose row stride is a power of two hits
// one L1 set; see the AVX-512 file).
template <typename Col>
inline void f32_store_tile8(const F32Task& t, int64_t n0, int64_t channels, int64_t row0, Col col) {
  __m256 r[8];
  for (int c = 0; c < 8; ++c) r[c] = c < channels ? _mm256_load_ps(col(c)) : _mm256_setzero_ps();
  transpose8x8(r);
  const __m256i lanes = lanes_mask(channels);
  const __m256 bias = t.bias != nullptr ? _mm256_maskload_ps(t.bias + n0, lanes) : _mm256_setzero_ps();
  const int64_t rows = t.m - row0 < 8 ? t.m - row0 : 8;
  for (int64_t i = 0; i < rows; ++i) {
    __m256 y = r[i];
    if (t.bias != nullptr) y = _mm256_add_ps(y, bias);
    y = apply_activation_avx2(y, t.act);
    _mm256_maskstore_ps(t.y + (row0 + i) * t.ldy + n0, lanes, y);
  }
}

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

// One run of csr panel entries [j, j1) (segments are padded to multiples of 4,
// sparse.h) into out (MV ymm of 8 rows); x^T row stride the constant LD floats
// (the driver's ld: 16 for up to 16 rows, 32 above). Weights are broadcast
// straight from memory (a load, no shuffle on AVX2 CPUs).
// S accumulator sets take the entries in turn (4 entries per iteration: with
// S = 4 no faster than 2 on Zen 4, noisy).
template <int MV, int LD, int S>
inline void f32_panel_run8(const float* xt, const float* vals, const uint16_t* idx, int64_t j, int64_t j1,
                           __m256* out) {
  __m256 acc[S][MV];
#pragma GCC unroll 4
  for (int v = 0; v < MV; ++v) {
    acc[0][v] = out[v];
#pragma GCC unroll 4
    for (int s = 1; s < S; ++s) acc[s][v] = _mm256_setzero_ps();
  }
  auto fma = [&](int s, const float* w, uint64_t k) {
    const __m256 wb = _mm256_broadcast_ss(w);
    const float* xr = xt + static_cast<int64_t>(k) * LD;
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[s][v] = _mm256_fmadd_ps(wb, _mm256_load_ps(xr + 8 * v), acc[s][v]);
  };
  for (; j < j1; j += 4) {
    uint64_t ks;
    std::memcpy(&ks, idx + j, sizeof ks);
    fma(0, vals + j, ks & 0xFFFFu);
    fma(1 % S, vals + j + 1, (ks >> 16) & 0xFFFFu);
    fma(2 % S, vals + j + 2, (ks >> 32) & 0xFFFFu);
    fma(3 % S, vals + j + 3, ks >> 48);
  }
#pragma GCC unroll 4
  for (int v = 0; v < MV; ++v) {
#pragma GCC unroll 4
    for (int s = 1; s < S; ++s) acc[0][v] = _mm256_add_ps(acc[0][v], acc[s][v]);
    out[v] = acc[0][v];
  }
}

// Cols kernel over csr panels: panels_loop (sparse_panels.h) with each
// channel's partial sums as MV ymm of 8 rows; after the last panel the
// epilogue runs on 8 x 8 transposed tiles.
template <int MV, int LD, int S = (MV <= 2 ? 2 : 1)>
void f32_cols_panels_mv(const F32Task& t) {
  const CsrPanels& pn = *t.w->panels;
  panels_loop<MV * 8, 8, 8>(
      t.n0, t.n1, t.w->n, csr_panels_count(t.w->k), pn.sub,
      [&](uint32_t* part, int32_t j0, int32_t j1, bool first) {
        float* pr = reinterpret_cast<float*>(part);
        __m256 sums[MV];
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) sums[v] = first ? _mm256_setzero_ps() : _mm256_load_ps(pr + 8 * v);
        f32_panel_run8<MV, LD, S>(t.xt, pn.values, pn.idx, j0, j1, sums);
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) _mm256_store_ps(pr + 8 * v, sums[v]);
      },
      [&](int64_t c0, int64_t channels, auto part_of) {
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) {
          f32_store_tile8(t, c0, channels, 8 * v,
                          [&](int c) { return reinterpret_cast<const float*>(part_of(c)) + 8 * v; });
        }
      });
}

// 2 to kNarrowPanelRows rows, x^T rows of 8 floats (sparse.h, kNarrowPanelRows).
void f32_cols_panels_narrow_avx2(const F32Task& t) {
  static_assert(kNarrowPanelRows == 8, "one ymm of rows");
  f32_cols_panels_mv<1, 8>(t);
}

}  // namespace

// The AVX-512 path's narrow panels: ymm code, with the four accumulator sets
// of the AVX-512 cols kernels (acc_sets<1>), so a layer's eager calls (panels)
// and traced calls (the op, plain cols kernel) sum a single-panel row in the
// same order.
void f32_cols_panels_narrow_s4(const F32Task& t) { f32_cols_panels_mv<1, 8, 4>(t); }

namespace {

void f32_cols_panels_avx2(const F32Task& t) {
  static_assert(kPanelBlockRows == 32, "the driver hands this kernel at most 32 rows, ld 16 or 32");
  switch ((t.m + 7) / 8) {
    case 1: return t.ldxt == 16 ? f32_cols_panels_mv<1, 16>(t) : f32_cols_panels_mv<1, 32>(t);
    case 2: return t.ldxt == 16 ? f32_cols_panels_mv<2, 16>(t) : f32_cols_panels_mv<2, 32>(t);
    case 3: return f32_cols_panels_mv<3, 32>(t);
    default: return f32_cols_panels_mv<4, 32>(t);
  }
}

void q8_rows_avx2(const Q8Task& t) {
  const Q8Weights& w = *t.w;
  for (int64_t r = 0; r < t.m; ++r) {
    const uint8_t* xq = t.xq + r * w.kp;
    for (int64_t n = t.n0; n < t.n1; ++n) {
      __m256i acc = _mm256_setzero_si256();
      int64_t b = w.row_ptr[n];
      const int64_t b1 = w.row_ptr[n + 1];
      for (; b + 8 <= b1; b += 8) {
        const __m256i idx = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.blk_idx + b)));
        const __m256i xg = _mm256_i32gather_epi32(reinterpret_cast<const int*>(xq), idx, 4);
        const __m128i* wp = reinterpret_cast<const __m128i*>(w.values + 4 * b);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(xg)),
                                                      _mm256_cvtepi8_epi16(_mm_loadu_si128(wp))));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(xg, 1)),
                                                      _mm256_cvtepi8_epi16(_mm_loadu_si128(wp + 1))));
      }
      uint32_t tail = 0;
      for (; b < b1; ++b) {
        const uint8_t* a = xq + 4 * static_cast<int64_t>(w.blk_idx[b]);
        for (int j = 0; j < 4; ++j) tail += static_cast<uint32_t>(static_cast<int32_t>(a[j]) * w.values[4 * b + j]);
      }
      q8_store_scalar(t, r, n, static_cast<int32_t>(static_cast<uint32_t>(hsum_epi32(acc)) + tail));
    }
  }
}

// 16 rows x 4 bytes of transposed activations times one 1x4 block: 4 vpmaddwd,
// each leaving (pair sum, pair sum) for 4 rows; folded per row at the end.
// int8 twin of f32_store_tile8: the 8 rows from row0 of `channels` (<= 8)
// channels from n0 (col(c): channel c's 8 int32 row sums), transposed in
// registers; per lane the same IEEE operations as q8_epilogue, then one masked
// store per row (or the raw sums, for the test hook).
template <typename Col>
inline void q8_store_tile8(const Q8Task& t, int64_t n0, int64_t channels, int64_t row0, Col col) {
  __m256 r[8];
  for (int c = 0; c < 8; ++c) r[c] = c < channels ? _mm256_load_ps(col(c)) : _mm256_setzero_ps();
  transpose8x8(r);
  const __m256i lanes = lanes_mask(channels);
  const int64_t rows = t.m - row0 < 8 ? t.m - row0 : 8;
  if (t.raw != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      _mm256_maskstore_epi32(t.raw + (row0 + i) * t.ldraw + n0, lanes, _mm256_castps_si256(r[i]));
    }
    return;
  }
  const __m256i col_sum = _mm256_maskload_epi32(t.w->col_sum + n0, lanes);
  const __m256 w_scale = _mm256_maskload_ps(t.w->w_scale + n0, lanes);
  const __m256 bias = t.bias != nullptr ? _mm256_maskload_ps(t.bias + n0, lanes) : _mm256_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = row0 + i;
    const __m256i corrected =
        _mm256_sub_epi32(_mm256_castps_si256(r[i]), _mm256_mullo_epi32(_mm256_set1_epi32(t.row_zp[row]), col_sum));
    __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(corrected), _mm256_mul_ps(_mm256_set1_ps(t.row_scale[row]), w_scale));
    if (t.bias != nullptr) y = _mm256_add_ps(y, bias);
    y = apply_activation_avx2(y, t.act);
    _mm256_maskstore_ps(t.y + row * t.ldy + n0, lanes, y);
  }
}

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

void q8_cols_avx2(const Q8Task& t) {
  for (int64_t row0 = 0; row0 < t.m; row0 += 32) {
    if (t.m - row0 > 16) q8_cols_pass<2>(t, row0); else q8_cols_pass<1>(t, row0);
  }
}

// Sliced layout (sparse.h) in two halves of 8 lanes: the 16-group window is
// two ymm, vpermd picks within each and the offset's bit 3 selects between
// them (blendv on the offset shifted into the sign bit). The dot product is
// vpmaddwd on zero-extended bytes (no saturation), pairs folded at the end.
void q8_sliced_avx2(const SlicedTask& t) {
  const SlicedWeights& w = *t.w;
  const __m256i shifts[2] = {_mm256_set_epi32(12, 12, 8, 8, 4, 4, 0, 0), _mm256_set_epi32(28, 28, 24, 24, 20, 20, 16, 16)};
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int64_t s = t.s0; s < t.s1; ++s) {
    const int64_t n0 = s * kSliceLanes;
    for (int64_t r = 0; r < t.m; ++r) {
      const uint8_t* xq = t.xq + r * t.ldq;
      __m256i acc[2][2] = {{_mm256_setzero_si256(), _mm256_setzero_si256()},
                           {_mm256_setzero_si256(), _mm256_setzero_si256()}};
      for (int64_t j = w.slice_ptr[s]; j < w.slice_ptr[s + 1]; ++j) {
        int64_t lanes;
        std::memcpy(&lanes, w.step_lane + 2 * j, sizeof lanes);
        const __m256i all = _mm256_set1_epi64x(lanes);
        const uint8_t* xw = xq + 4 * static_cast<int64_t>(w.step_base[j]);
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xw));
        const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xw + 32));
        for (int h = 0; h < 2; ++h) {
          const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(all, shifts[h]), low4);
          const __m256 pick_hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
          const __m256i xv = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(_mm256_permutevar8x32_epi32(lo, idx)),
                                                                  _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(hi, idx)),
                                                                  pick_hi));
          const __m128i* wp = reinterpret_cast<const __m128i*>(w.values + 64 * j + 32 * h);
          acc[h][0] = _mm256_add_epi32(acc[h][0], _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(xv)),
                                                                    _mm256_cvtepi8_epi16(_mm_loadu_si128(wp))));
          acc[h][1] = _mm256_add_epi32(acc[h][1], _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(xv, 1)),
                                                                    _mm256_cvtepi8_epi16(_mm_loadu_si128(wp + 1))));
        }
      }
      alignas(32) int32_t sums[kSliceLanes];
      for (int h = 0; h < 2; ++h) {
        // hadd leaves channels (0 1 4 5 | 2 3 6 7) of the half; qword order 0 2 1 3 restores them.
        const __m256i folded = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[h][0], acc[h][1]), 0xD8);
        _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8 * h), folded);
      }
      for (int64_t l = 0; l < kSliceLanes && n0 + l < w.n; ++l) {
        const int64_t n = n0 + l;
        q8_store_scalar(t, r, n, sums[l]);
      }
    }
  }
}

}  // namespace

const Kernels& kernels_avx2() {
  // No vpermb below AVX-512 VBMI: the byte layout runs the scalar spec (SparseInt8Linear never picks it here).
  static const Kernels k{f32_rows_avx2, f32_cols_avx2, f32_cols_panels_avx2, f32_cols_panels_narrow_avx2,
                         q8_rows_avx2, q8_cols_avx2, nullptr, q8_sliced_avx2, kernels_scalar().q8_sliced_bytes};
  return k;
}

}  // namespace sparse
}  // namespace pycompress
