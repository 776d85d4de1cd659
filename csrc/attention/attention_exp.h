// Constants of the vector exp (attention.h, "exp"). Internal linkage: included by
// translation units compiled with different ISA flags.
#pragma once

namespace pycompress {
namespace attention {
namespace {
namespace exp_c {
// exp(x) = 2^n exp(r), n = round(x log2 e), r = x - n ln2 with ln2 split in two
// (kLn2Hi has 9 significant bits, so n * kLn2Hi is exact for |n| <= 2^15).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
// Inputs are clamped to [kMinX, kMaxX] (NaN passes through): below kMinX the result
// rounds to 0 (exp(-104) < half the smallest subnormal), above kMaxX it is +inf.
constexpr float kMinX = -104.0f;
constexpr float kMaxX = 89.0f;
// exp(r) = 1 + r + r^2 (c0 + r (c1 + r (c2 + r (c3 + r c4)))) on |r| <= ln2/2:
// relative fit error 3.6e-9 (bench/exp_coefficients.py derives them).
constexpr float kC0 = 0.4999999403953552f;
constexpr float kC1 = 0.1666652113199234f;
constexpr float kC2 = 0.04166838899254799f;
constexpr float kC3 = 0.00836874544620514f;
constexpr float kC4 = 0.0013814539415761828f;
}  // namespace exp_c
}  // namespace
}  // namespace attention
}  // namespace pycompress
