// AVX2 rows (gather) kernels of the sparse linears (sparse.h), tile 1 row x 1
// output channel: per channel the row's activations are gathered from
// row-major x, 16 nonzeros (fp32, two vgatherdps) or 8 1x4 blocks (int8, one
// vpgatherdd) per step, and reduced at the end. int8 products use vpmaddwd on
// zero-extended activations and sign-extended weights (two exact u8*s8
// products per int32 lane): vpmaddubsw would saturate its int16 pair sums
// (255*127*2 > 32767) and make the result depend on the CPU. The AVX-512
// levels run the fp32 kernel of this file too (sparse_dispatch.cpp).
#include <immintrin.h>

#include "sparse/sparse_epilogue.h"
#include "sparse/sparse_kernels.h"

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

}  // namespace

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

}  // namespace sparse
}  // namespace pycompress
