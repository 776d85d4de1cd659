// Constants of the vector 2^x (attention.h, "exp"). Internal linkage: included by
// translation units compiled with different ISA flags.
#pragma once

namespace pycompress {
namespace attention {
namespace {
namespace exp_c {
// The vector paths work in base 2: scores carry a factor log2(e) (folded into q and
// into additive masks) and probabilities are 2^x. 2^x = 2^n 2^f with n = round(x) and
// f = x - n exact, |f| <= 1/2: no Cody-Waite split is needed.
constexpr float kLog2e = 1.44269504088896341f;
// Inputs are clamped to [kMinX, kMaxX] (NaN passes through): 2^-150 rounds to 0 and
// 2^129 overflows to +inf, so the clamp changes no result.
constexpr float kMinX = -150.0f;
constexpr float kMaxX = 129.0f;
// 2^f = 1 + f (c1 + f (c2 + f (c3 + f (c4 + f (c5 + f c6))))) on |f| <= 1/2:
// relative fit error 1.6e-8 (bench/exp_coefficients.py derives them).
constexpr float kC1 = 0.6931471824645996f;
constexpr float kC2 = 0.24022647738456726f;
constexpr float kC3 = 0.055503323674201965f;
constexpr float kC4 = 0.00961843691766262f;
constexpr float kC5 = 0.0013398873852565885f;
constexpr float kC6 = 0.00015353361959569156f;
}  // namespace exp_c
}  // namespace
}  // namespace attention
}  // namespace pycompress
