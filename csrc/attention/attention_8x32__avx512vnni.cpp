// AVX-512 attention: 8 query rows x 32 keys score tiles and 8 rows x 32 output
// columns PV tiles (16 zmm accumulators each). Needs only AVX-512F; it lives
// with the avx512vnni path because that is the ISA level the dispatch selects.
#include <immintrin.h>

#include "attention/attention_blocked.h"
#include "attention/attention_exp.h"

namespace pycompress {
namespace attention {
namespace {

struct VecAvx512 {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static __mmask16 lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static T load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
  static void store_partial(float* p, T x, int n) { _mm512_mask_storeu_ps(p, lanes(n), x); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static float hmax(T x) { return _mm512_reduce_max_ps(x); }
  static float hsum(T x) { return _mm512_reduce_add_ps(x); }
  static float first(T x) { return _mm512_cvtss_f32(x); }
  static void transpose(const float* src, int64_t lds, float* dst, int64_t ldd) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
    // 32-bit, then 64-bit interleaves within 128-bit lanes, then two 128-bit lane shuffles.
    // (maskz forms with every lane selected: GCC 12's plain forms warn of an uninitialised
    // pass-through operand.)
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_maskz_unpacklo_ps(0xFFFF, r[i], r[i + 1]);
      t[i + 1] = _mm512_maskz_unpackhi_ps(0xFFFF, r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, _mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, _mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, _mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
      r[i + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, _mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    // r[4q + c] now holds, in 128-bit lane L, column c of rows 4q..4q+3 for columns 4L..4L+3.
    for (int c = 0; c < 4; ++c) {
      t[c] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[c], r[4 + c], 0x88);  // lanes 0,2 of each
      t[4 + c] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[c], r[4 + c], 0xdd);  // lanes 1,3
      t[8 + c] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[8 + c], r[12 + c], 0x88);
      t[12 + c] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[8 + c], r[12 + c], 0xdd);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm512_maskz_shuffle_f32x4(0xFFFF, t[c], t[8 + c], 0x88);  // column c (lane 0)
      r[8 + c] = _mm512_maskz_shuffle_f32x4(0xFFFF, t[c], t[8 + c], 0xdd);  // column 8 + c (lane 2)
      r[4 + c] = _mm512_maskz_shuffle_f32x4(0xFFFF, t[4 + c], t[12 + c], 0x88);  // column 4 + c (lane 1)
      r[12 + c] = _mm512_maskz_shuffle_f32x4(0xFFFF, t[4 + c], t[12 + c], 0xdd);  // column 12 + c (lane 3)
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
  }
  static T bool_keep(T s, const uint8_t* keep) {
    const __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keep)));
    const __mmask16 masked = _mm512_cmpeq_epi32_mask(k, _mm512_setzero_si512());
    return _mm512_mask_mov_ps(s, masked, _mm512_set1_ps(-__builtin_inff()));
  }
  static T exp2(T x) {
    using namespace exp_c;
    // max/min return their second operand when either is NaN: NaN passes through.
    x = _mm512_max_ps(_mm512_set1_ps(kMinX), x);
    x = _mm512_min_ps(_mm512_set1_ps(kMaxX), x);
    const T n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const T f = _mm512_sub_ps(x, n);
    T p = _mm512_set1_ps(kC6);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kC1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    // p * 2^n with one rounding, subnormal and overflowing results included.
    return _mm512_scalef_ps(p, n);
  }
};

}  // namespace

const Kernels& kernels_avx512vnni() {
  static const Kernels k{false, attend_rows_blocked<VecAvx512, 8, 2, 2>, exp2_n_blocked<VecAvx512>};
  return k;
}

}  // namespace attention
}  // namespace pycompress
