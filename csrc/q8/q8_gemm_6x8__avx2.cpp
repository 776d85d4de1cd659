// AVX2 path. vpmaddubsw (u8 x s8 pairs summed into a saturating int16) is the
// usual AVX2 int8 trick, and the reason FBGEMM and ONNX Runtime give
// CPU-dependent answers: 255*127 + 255*127 does not fit int16. Here both
// operands are widened to int16 and multiplied with vpmaddwd, whose pair sums
// land in int32 (|255*128*2| < 2^31): exact, identical to VNNI and scalar.
//
// Layout use: widening 16 bytes of a packed group gives 4 channels x 4 k as
// int16; vpmaddwd against the row's 4 activations (broadcast) leaves two
// partial sums per channel, folded with vphaddd after the K loop.
#include <immintrin.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/vec_math_avx2.h"
#include "q8/q8_gemm.h"
#include "q8/q8_gemm_dot4_ymm.h"
#include "q8/q8_store_avx2.h"

namespace pycompress {
namespace q8 {
namespace {

inline float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// One row's range and NaN/Inf probe (see the AVX-512 file) in four independent
// chains of 8 floats.
inline void row_range(const float* x, int64_t k, float* lo, float* hi, float* probe) {
  __m256 vlo[4], vhi[4], pr[4];
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u) vlo[u] = vhi[u] = pr[u] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * u);
      pr[u] = _mm256_add_ps(pr[u], _mm256_sub_ps(v, v));
      vlo[u] = _mm256_min_ps(vlo[u], v);
      vhi[u] = _mm256_max_ps(vhi[u], v);
    }
  }
  for (; i < k; i += 8) {  // masked-off lanes load 0, which every range holds already
    const __m256 v = _mm256_maskload_ps(x + i, tail_mask8(k - i));
    pr[0] = _mm256_add_ps(pr[0], _mm256_sub_ps(v, v));
    vlo[0] = _mm256_min_ps(vlo[0], v);
    vhi[0] = _mm256_max_ps(vhi[0], v);
  }
  *lo = hmin(_mm256_min_ps(_mm256_min_ps(vlo[0], vlo[1]), _mm256_min_ps(vlo[2], vlo[3])));
  *hi = hmax(_mm256_max_ps(_mm256_max_ps(vhi[0], vhi[1]), _mm256_max_ps(vhi[2], vhi[3])));
  *probe = hsum(_mm256_add_ps(_mm256_add_ps(pr[0], pr[1]), _mm256_add_ps(pr[2], pr[3])));
}

// q[0, len) = the quantized x[0, len).
inline void quantize_run(const float* x, int64_t len, uint8_t* q, float inv_scale, int32_t zp, int32_t qmax) {
  const __m256 vinv = _mm256_set1_ps(inv_scale);
  const __m256 vmin = _mm256_set1_ps(-256.0f), vmax = _mm256_set1_ps(256.0f);
  const __m256i vzp = _mm256_set1_epi32(zp);
  // round(x / scale) + zp, in [-256, 511] thanks to the +-256 pre-clamp.
  auto quantize8 = [&](__m256 v) {
    v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, vinv), vmin), vmax);
    return _mm256_add_epi32(_mm256_cvtps_epi32(v), vzp);
  };
  int64_t k = 0;
  // 32 values per step: the saturating packs are exact (int16) and then the
  // [0, 255] clamp (uint8), and a byte min clamps to qmax; one vpermd undoes
  // their 128-bit lane interleave.
  const __m256i lane_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i vqmax8 = _mm256_set1_epi8(static_cast<char>(qmax));
  for (; k + 32 <= len; k += 32) {
    const __m256i a = quantize8(_mm256_loadu_ps(x + k));
    const __m256i b = quantize8(_mm256_loadu_ps(x + k + 8));
    const __m256i c = quantize8(_mm256_loadu_ps(x + k + 16));
    const __m256i d = quantize8(_mm256_loadu_ps(x + k + 24));
    const __m256i bytes =
        _mm256_min_epu8(_mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d)), vqmax8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permutevar8x32_epi32(bytes, lane_order));
  }
  const __m256i q0 = _mm256_setzero_si256(), vqmax = _mm256_set1_epi32(qmax);
  for (; k < len; k += 8) {
    const __m256i in = tail_mask8(len - k);
    __m256i qi = quantize8(_mm256_maskload_ps(x + k, in));
    qi = _mm256_min_epi32(_mm256_max_epi32(qi, q0), vqmax);
    // 8 int32 in [0, 255] -> 8 bytes.
    const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
    const __m128i b8 = _mm_packus_epi16(w16, w16);
    alignas(16) uint8_t tmp[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), b8);
    std::memcpy(q + k, tmp, static_cast<size_t>(len - k < 8 ? len - k : 8));
  }
}

void quantize_rows_avx2(const QuantizeRows& p) { quantize_rows_with(p, row_range, quantize_run); }

// Sums adjacent int32 pairs of two accumulators (4 channels x 2 halves each)
// into 8 consecutive channel totals.
inline __m256i fold_pairs(__m256i lo4, __m256i hi4) {
  const __m256i h = _mm256_hadd_epi32(lo4, hi4);  // [c0 c1 c4 c5 | c2 c3 c6 c7]
  return _mm256_permute4x64_epi64(h, 0xD8);       // [c0 .. c7]
}

// Rows [r0, r0 + MR) x channels [n, n + 4 * NV) (n a multiple of 8, inside one
// panel). `a16` holds the tile's activations widened to int16 (row stride kp):
// a row's 4 activations of a group are one 64-bit broadcast, a load without a
// shuffle, so a group costs NV widened weight vectors shared by MR rows, and
// MR * NV vpmaddwd + vpaddd.
template <int MR, int NV>
void tile_rows(const GemmTile& t, const int16_t* a16, int64_t r0, int64_t n) {
  const int64_t groups = t.kp / kKGroup;
  const int8_t* w = t.w + (n / kPanel) * t.kp * kPanel + (n % kPanel) * kKGroup;
  const int16_t* a = a16 + r0 * t.kp;

  __m256i acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_si256();

  for (int64_t g = 0; g < groups; ++g) {
    __m256i wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      wv[v] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 64 + v * 16)));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int64_t a4;
      std::memcpy(&a4, a + r * t.kp + g * kKGroup, sizeof a4);
      const __m256i ab = _mm256_set1_epi64x(a4);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(ab, wv[v]));
        // Pins the sum here: left alone, GCC issues every product first and
        // spills the accumulators it no longer has registers for.
        __asm__("" : "+x"(acc[r][v]));
      }
    }
  }

#pragma GCC unroll 2
  for (int h = 0; h < NV / 2; ++h) {
    const Columns8 cols = load_columns8(t, n + 8 * h);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) store_row8(t, cols, r0 + r, fold_pairs(acc[r][2 * h], acc[r][2 * h + 1]));
  }
}

// Rows [r0, r0 + MR) against the whole tile, 4 * NV channels at a time.
template <int MR, int NV>
void row_block(const GemmTile& t, const int16_t* a16, int64_t r0) {
  for (int64_t n = t.n0; n < t.n0 + t.ncols; n += 4 * NV) tile_rows<MR, NV>(t, a16, r0, n);
}

// Microkernel: 6 rows x 8 channels (12 accumulators, 2 weights, 1 broadcast,
// 1 product of 16 ymm registers); 1 or 2 rows take 16 channels at once.
// (16, 4096, 4096) / (128, 768, 3072) on one Zen 5 core: 129 / 176 GOPS, from
// 77 / 82 with 2 x 16 tiles that widened the activations per group; the exact
// vpmaddwd ceiling there is ~200 GOPS (bench/peak).
void gemm_tile_avx2(const GemmTile& t) {
  // The tile's activation rows widened to int16 once (a tile's rows are reread
  // for each of its 8 channel groups): the vpmaddwd operands.
  thread_local std::vector<int16_t> wide;
  if (wide.size() < static_cast<size_t>(t.m * t.kp)) wide.resize(static_cast<size_t>(t.m * t.kp));
  for (int64_t r = 0; r < t.m; ++r) {
    const uint8_t* src = t.a + r * t.lda;
    int16_t* dst = wide.data() + r * t.kp;
    int64_t k = 0;
    for (; k + 16 <= t.kp; k += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
    }
    for (; k < t.kp; ++k) dst[k] = src[k];
  }
  const int16_t* a16 = wide.data();
  int64_t r0 = 0;
  for (; r0 + 6 <= t.m; r0 += 6) row_block<6, 2>(t, a16, r0);
  switch (t.m - r0) {
    case 5: return row_block<5, 2>(t, a16, r0);
    case 4: return row_block<4, 2>(t, a16, r0);
    case 3: return row_block<3, 2>(t, a16, r0);
    case 2: return row_block<2, 4>(t, a16, r0);
    case 1: return row_block<1, 4>(t, a16, r0);
    default: return;
  }
}

// u7 activations (q8_gemm_dot4_ymm.h): vpmaddubsw + vpmaddwd(ones) + vpaddd,
// 4 rows x 16 columns (8 accumulators, 2 weights, 1 broadcast, the ones and
// the products).
struct U7Dot {
  static constexpr int kRows = 4;
  static __m256i step(__m256i acc, __m256i a4, __m256i w) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a4, w), _mm256_set1_epi16(1)));
  }
};

void gemm_tile_u7_avx2(const GemmTile& t) { dot4_gemm_tile<U7Dot>(t); }

}  // namespace

const Kernels& kernels_avx2() {
  static const Kernels k{quantize_rows_avx2, gemm_tile_avx2, gemm_tile_u7_avx2};
  return k;
}

}  // namespace q8
}  // namespace pycompress
