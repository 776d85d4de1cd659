// AVX2 mirrors of epilogue_math.h: the same IEEE operations in the same
// order, so results are bit-identical to the scalar specification.
// Include only from translation units compiled with AVX2 flags.
#pragma once

#include <immintrin.h>

#include "common/epilogue_math.h"

namespace pycompress {
namespace {

inline __m256 gelu_avx2(__m256 x) {
  using namespace gelu_c;
  __m256 s = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(kScale));
  s = _mm256_min_ps(s, _mm256_set1_ps(kMaxIndex));  // NaN -> 7, as in the scalar spec
  const __m256 n = _mm256_round_ps(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 t = _mm256_sub_ps(s, n);
  const __m256i i = _mm256_cvtps_epi32(n);
  __m256 e = _mm256_permutevar8x32_ps(_mm256_load_ps(kTable[kDegree]), i);
  for (int j = kDegree - 1; j >= 0; --j)
    e = _mm256_add_ps(_mm256_mul_ps(e, t), _mm256_permutevar8x32_ps(_mm256_load_ps(kTable[j]), i));
  const __m256 nonneg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
  const __m256 phi = _mm256_blendv_ps(e, _mm256_sub_ps(_mm256_set1_ps(1.0f), e), nonneg);
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
