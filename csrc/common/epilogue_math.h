// Scalar float math shared by every kernel epilogue.
//
// The vector paths (vec_math_avx2.h, vec_math_avx512.h) perform exactly the
// same IEEE operations in the same order (no FMA contraction, no fast-math:
// CMakeLists sets -ffp-contract=off), so a fused GELU gives the same bits on
// every CPU. That is why GELU uses its own erfc/exp instead of libm, whose
// vectorised and scalar versions differ in the last ulp.
//
// Everything here has internal linkage: this header is included by translation
// units compiled with different ISA flags, and a shared inline definition could
// let the linker keep an AVX-512 copy for the scalar path.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pycompress {

// Fused epilogue activation (codes shared with pycompress/ops.py).
enum class Activation : int { None = 0, Relu = 1, Gelu = 2 };

namespace {

// Constants of the GELU approximation, shared with the vector paths.
namespace gelu_c {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.428606765330187045e-06f;
constexpr float kExpMin = -87.0f;
// Taylor coefficients 1/k! for exp on [-ln2/2, ln2/2]; degree 7 keeps the
// truncation error below 1e-8.
constexpr float kE7 = 1.0f / 5040.0f, kE6 = 1.0f / 720.0f, kE5 = 1.0f / 120.0f,
                kE4 = 1.0f / 24.0f, kE3 = 1.0f / 6.0f, kE2 = 0.5f, kE1 = 1.0f, kE0 = 1.0f;
// Abramowitz & Stegun 7.1.26: |erfc error| <= 1.5e-7 for z >= 0.
constexpr float kP = 0.3275911f;
constexpr float kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f,
                kA4 = -1.453152027f, kA5 = 1.061405429f;
constexpr float kInvSqrt2 = 0.70710678118654752f;
}  // namespace gelu_c

inline float bits_to_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// exp(v) for v <= 0 (clamped at kExpMin), Cody-Waite reduction + Taylor.
inline float exp_nonpositive(float v) {
  using namespace gelu_c;
  v = v < kExpMin ? kExpMin : v;
  const float n = std::nearbyint(v * kLog2e);
  float r = v - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kE7;
  p = p * r + kE6;
  p = p * r + kE5;
  p = p * r + kE4;
  p = p * r + kE3;
  p = p * r + kE2;
  p = p * r + kE1;
  p = p * r + kE0;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// GELU(x) = x * Phi(x), Phi from erfc so negative x keeps relative accuracy.
inline float gelu(float x) {
  using namespace gelu_c;
  const float z = std::fabs(x) * kInvSqrt2;
  const float t = 1.0f / (1.0f + kP * z);
  float poly = kA5;
  poly = poly * t + kA4;
  poly = poly * t + kA3;
  poly = poly * t + kA2;
  poly = poly * t + kA1;
  const float half_erfc = 0.5f * (t * poly) * exp_nonpositive(-(z * z));
  const float phi = x >= 0.0f ? 1.0f - half_erfc : half_erfc;
  return x * phi;
}

// Matches _mm*_max_ps(v, 0): a NaN becomes 0 on every path.
inline float relu(float v) { return v > 0.0f ? v : 0.0f; }

inline float apply_activation(float v, Activation act) {
  switch (act) {
    case Activation::Relu: return relu(v);
    case Activation::Gelu: return gelu(v);
    case Activation::None: break;
  }
  return v;
}

}  // namespace
}  // namespace pycompress
