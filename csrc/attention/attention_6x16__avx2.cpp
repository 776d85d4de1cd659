// AVX2 + FMA attention: 6 query rows x 16 keys score tiles and 6 rows x 16
// output columns PV tiles (12 ymm accumulators each, of the 16 registers).
#include <immintrin.h>

#include "attention/attention_blocked.h"
#include "attention/attention_exp.h"

namespace pycompress {
namespace attention {
namespace {

alignas(32) constexpr int32_t kLaneMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

struct VecAvx2 {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  // First n lanes all-ones: a window into the table.
  static __m256i lanes(int n) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLaneMaskTable + 8 - n)); }
  static T load_partial(const float* p, int n) { return _mm256_maskload_ps(p, lanes(n)); }
  static void store_partial(float* p, T x, int n) { _mm256_maskstore_ps(p, lanes(n), x); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static float hmax(T x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float hsum(T x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float first(T x) { return _mm256_cvtss_f32(x); }
  static void transpose(const float* src, int64_t lds, float* dst, int64_t ldd) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
      r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    // r[4q + c]: column c (low 128) and column 4 + c (high 128) of rows 4q..4q+3.
    for (int c = 0; c < 4; ++c) {
      _mm256_storeu_ps(dst + c * ldd, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
      _mm256_storeu_ps(dst + (4 + c) * ldd, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
    }
  }
  static T bool_keep(T s, const uint8_t* keep) {
    const __m256i k = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep)));
    const __m256 masked = _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_setzero_si256()));
    return _mm256_blendv_ps(s, _mm256_set1_ps(-__builtin_inff()), masked);
  }
  // 2^e for integer-valued e in [-126, 127], built in the exponent field.
  static T pow2(__m256i e) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)); }
  static T exp2(T x) {
    using namespace exp_c;
    x = _mm256_max_ps(_mm256_set1_ps(kMinX), x);  // NaN passes through (second operand)
    x = _mm256_min_ps(_mm256_set1_ps(kMaxX), x);
    const T n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const T f = _mm256_sub_ps(x, n);
    T p = _mm256_set1_ps(kC6);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC5));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    // n in [-150, 129] (NaN converts to INT_MIN; p is NaN then and stays NaN):
    // 2^n = 2^(n/2) 2^(n - n/2), each factor normal, so a subnormal result rounds once.
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i n1 = _mm256_srai_epi32(ni, 1);
    const __m256i n2 = _mm256_sub_epi32(ni, n1);
    return _mm256_mul_ps(_mm256_mul_ps(p, pow2(n1)), pow2(n2));
  }
};

}  // namespace

const Kernels& kernels_avx2() {
  static const Kernels k{false, attend_rows_blocked<VecAvx2, 6, 2, 2>, exp2_n_blocked<VecAvx2>};
  return k;
}

}  // namespace attention
}  // namespace pycompress
