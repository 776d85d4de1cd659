// AVX-512 mirrors of epilogue_math.h: the same IEEE operations in the same
// order, so results are bit-identical to the scalar specification; and the
// lane mask of a tail, which every AVX-512 kernel uses.
// Include only from translation units compiled with AVX-512 flags.
#pragma once

#include <immintrin.h>

#include "common/epilogue_math.h"

namespace pycompress {
namespace {

// The first `valid` of 16 lanes: all for valid >= 16, none for valid <= 0.
inline __mmask16 tail_mask16(int64_t valid) {
  return valid >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>(valid <= 0 ? 0u : (1u << valid) - 1u);
}

// acc += the u8 x s8 dot products of 4 (vpdpbusd zmm), as inline asm. GCC 12
// allocates the intrinsic _mm512_dpbusd_epi32 badly in some loops: it copies
// each accumulator to another register and back around every vpdpbusd (the int8
// GEMV loop: 32 instructions for 8 vpdpbusd; 16 with this) and in others it
// does not (there the asm can be worse: more registers pinned). Used where the
// innermost loop was measured shorter with it. Operands in registers only:
// allowed a memory operand, GCC stored unpacked weights to the stack for it.
inline void dpbusd_avx512(__m512i& acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
}

inline __m512 gelu_avx512(__m512 x) {
  using namespace gelu_c;
  __m512 s = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(kScale));
  s = _mm512_min_ps(s, _mm512_set1_ps(kMaxIndex));  // NaN -> 7, as in the scalar spec
  const __m512 n = _mm512_roundscale_ps(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 t = _mm512_sub_ps(s, n);
  const __m512i i = _mm512_cvtps_epi32(n);
  __m512 e = _mm512_permutexvar_ps(i, _mm512_load_ps(kTable[kDegree]));
  for (int j = kDegree - 1; j >= 0; --j)
    e = _mm512_add_ps(_mm512_mul_ps(e, t), _mm512_permutexvar_ps(i, _mm512_load_ps(kTable[j])));
  const __mmask16 nonneg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 phi = _mm512_mask_blend_ps(nonneg, e, _mm512_sub_ps(_mm512_set1_ps(1.0f), e));
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
