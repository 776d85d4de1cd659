// AVX-512 mirrors of epilogue_math.h: the same IEEE operations in the same
// order, so results are bit-identical to the scalar specification.
// Include only from translation units compiled with AVX-512 flags.
#pragma once

#include <immintrin.h>

#include "common/epilogue_math.h"

namespace pycompress {
namespace {

inline __m512 exp_nonpositive_avx512(__m512 v) {
  using namespace gelu_c;
  v = _mm512_max_ps(v, _mm512_set1_ps(kExpMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(v, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Hi)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Lo)));
  __m512 p = _mm512_set1_ps(kE7);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kE6));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kE5));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kE4));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kE3));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kE2));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kE1));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kE0));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

inline __m512 gelu_avx512(__m512 x) {
  using namespace gelu_c;
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(kInvSqrt2));
  const __m512 t = _mm512_div_ps(one, _mm512_add_ps(one, _mm512_mul_ps(_mm512_set1_ps(kP), z)));
  __m512 poly = _mm512_set1_ps(kA5);
  poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(kA4));
  poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(kA3));
  poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(kA2));
  poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(kA1));
  const __m512 neg_z2 = _mm512_xor_ps(_mm512_set1_ps(-0.0f), _mm512_mul_ps(z, z));
  const __m512 half_erfc = _mm512_mul_ps(
      _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_mul_ps(t, poly)), exp_nonpositive_avx512(neg_z2));
  const __mmask16 nonneg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 phi = _mm512_mask_blend_ps(nonneg, half_erfc, _mm512_sub_ps(one, half_erfc));
  return _mm512_mul_ps(x, phi);
}

inline __m512 apply_activation_avx512(__m512 v, Activation act) {
  switch (act) {
    case Activation::Relu: return _mm512_max_ps(v, _mm512_setzero_ps());
    case Activation::Gelu: return gelu_avx512(v);
    case Activation::None: break;
  }
  return v;
}

}  // namespace
}  // namespace pycompress
