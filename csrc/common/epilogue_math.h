// Scalar float math shared by every kernel epilogue.
//
// The vector paths (vec_math_avx2.h, vec_math_avx512.h) perform exactly the
// same IEEE operations in the same order (no FMA contraction, no fast-math:
// CMakeLists sets -ffp-contract=off), so a fused GELU gives the same bits on
// every CPU. That is why GELU uses its own approximation instead of libm's erf,
// whose vectorised and scalar versions differ in the last ulp.
//
// Everything here has internal linkage: this header is included by translation
// units compiled with different ISA flags, and a shared inline definition could
// let the linker keep an AVX-512 copy for the scalar path.
#pragma once

#include <cmath>

namespace pycompress {

// Fused epilogue activation (codes shared with pycompress/ops.py).
enum class Activation : int { None = 0, Relu = 1, Gelu = 2 };

namespace {

// GELU(x) = x * Phi(x) with E(u) = Phi(-u) = erfc(u / sqrt 2) / 2, u = |x|,
// as a piecewise polynomial: no division, no exp. With s = min(u * kScale, 7),
// n = round-to-nearest-even(s) picks one of 8 intervals and t = s - n (exact,
// |t| <= 1/2) is the local variable; E = degree-7 Horner in t with interval
// n's coefficients. Interval 7 (u >= 6.5 / kScale = 5.78, E(5.78) = 3.8e-9)
// is all zeros, so GELU saturates to exactly x, or -0 for x < 0. The vector
// paths fetch a coefficient with one 8-lane permute of a table row.
//
// Provenance: bench/gelu_coefficients.py (float64 least squares of E on 400
// Chebyshev nodes per interval, relative weights, rounded to float32; it
// prints this table). Fit error |E error| <= 7.8e-9 absolute, <= 7.6e-5
// relative for |x| <= 5.5, so negative x keeps relative accuracy.
namespace gelu_c {
constexpr float kScale = 1.125f;
constexpr float kMaxIndex = 7.0f;
constexpr int kDegree = 7;
// kTable[j][n]: coefficient of t^j on interval n; lanes 8..15 pad the rows to
// a zmm for the AVX-512 permute and are never selected. Held in a struct so the
// CUDA epilogue can copy it into constant memory (csrc/cuda/q8_gemm_mma__sm80.cu).
struct Table {
  float v[kDegree + 1][16];
};
alignas(64) constexpr Table kTableData = {{
    {0.5f, 0.187031403f, 0.0377201773f, 0.00383038074f, 0.000188590624f, 4.40598069e-06f, 4.82153979e-08f, 0.0f, 0, 0, 0, 0, 0, 0, 0, 0},
    {-0.35461536f, -0.238882527f, -0.0730239227f, -0.0101297572f, -0.000637656369f, -1.82156218e-05f, -2.36164865e-07f, 0.0f, 0, 0, 0, 0, 0, 0, 0, 0},
    {1.10906242e-07f, 0.0943730697f, 0.0576980971f, 0.0120056123f, 0.00100765168f, 3.59804471e-05f, 5.59593673e-07f, 0.0f, 0, 0, 0, 0, 0, 0, 0, 0},
    {0.0466966406f, 0.00660179509f, -0.0207752064f, -0.00815228373f, -0.000977631658f, -4.49568033e-05f, -8.50956894e-07f, 0.0f, 0, 0, 0, 0, 0, 0, 0, 0},
    {1.24101334e-05f, -0.0137260761f, 0.000605136564f, 0.00325081078f, 0.000639876409f, 3.96448522e-05f, 9.34881825e-07f, 0.0f, 0, 0, 0, 0, 0, 0, 0, 0},
    {-0.00558348466f, 0.00138989894f, 0.0022635099f, -0.000571833167f, -0.000288237265f, -2.62635058e-05f, -8.10426855e-07f, 0.0f, 0, 0, 0, 0, 0, 0, 0, 0},
    {0.000101577119f, 0.00122529629f, -0.000630033785f, -0.000123104881f, 8.33291924e-05f, 1.34461725e-05f, 5.66131291e-07f, 0.0f, 0, 0, 0, 0, 0, 0, 0, 0},
    {0.000427306222f, -0.000269911892f, -5.19857931e-05f, 8.60280488e-05f, -1.11374911e-05f, -4.32858724e-06f, -2.33907642e-07f, 0.0f, 0, 0, 0, 0, 0, 0, 0, 0},
}};
constexpr const float (&kTable)[kDegree + 1][16] = kTableData.v;
}  // namespace gelu_c

inline float gelu(float x) {
  using namespace gelu_c;
  float s = std::fabs(x) * kScale;
  s = s < kMaxIndex ? s : kMaxIndex;  // a NaN takes interval 7 (E = 0), as _mm*_min_ps(s, 7) does
  const float n = std::nearbyint(s);
  const float t = s - n;
  const int i = static_cast<int>(n);
  float e = kTable[kDegree][i];
  for (int j = kDegree - 1; j >= 0; --j) e = e * t + kTable[j][i];
  const float phi = x >= 0.0f ? 1.0f - e : e;
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
