// AVX2 mirrors of epilogue_math.h: the same IEEE operations in the same
// order, so results are bit-identical to the scalar specification.
// Include only from translation units compiled with AVX2 flags.
#pragma once

#include <immintrin.h>

#include "common/epilogue_math.h"

namespace pycompress {
namespace {

inline __m256 exp_nonpositive_avx2(__m256 v) {
  using namespace gelu_c;
  v = _mm256_max_ps(v, _mm256_set1_ps(kExpMin));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(v, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Hi)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Lo)));
  __m256 p = _mm256_set1_ps(kE7);
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kE6));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kE5));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kE4));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kE3));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kE2));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kE1));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kE0));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 gelu_avx2(__m256 x) {
  using namespace gelu_c;
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 z = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(kInvSqrt2));
  const __m256 t = _mm256_div_ps(one, _mm256_add_ps(one, _mm256_mul_ps(_mm256_set1_ps(kP), z)));
  __m256 poly = _mm256_set1_ps(kA5);
  poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(kA4));
  poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(kA3));
  poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(kA2));
  poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(kA1));
  const __m256 neg_z2 = _mm256_xor_ps(_mm256_set1_ps(-0.0f), _mm256_mul_ps(z, z));
  const __m256 half_erfc = _mm256_mul_ps(
      _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_mul_ps(t, poly)), exp_nonpositive_avx2(neg_z2));
  const __m256 nonneg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
  const __m256 phi = _mm256_blendv_ps(half_erfc, _mm256_sub_ps(one, half_erfc), nonneg);
  return _mm256_mul_ps(x, phi);
}

inline __m256 apply_activation_avx2(__m256 v, Activation act) {
  switch (act) {
    case Activation::Relu: return _mm256_max_ps(v, _mm256_setzero_ps());
    case Activation::Gelu: return gelu_avx2(v);
    case Activation::None: break;
  }
  return v;
}

}  // namespace
}  // namespace pycompress
