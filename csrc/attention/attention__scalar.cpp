// The executable specification of attention.h: one query row at a time, two
// passes over a score row of Sk floats, std::exp and double sums. No ISA flags.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/attention.h"

namespace pycompress {
namespace attention {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Score of query row i against key j before the softmax, mask and causality applied.
void score_row(const AttentionArgs& a, int64_t b, int64_t h, int64_t i, float* s) {
  const float* qi = a.q + b * a.q_sb + h * a.q_sh + i * a.q_ss;
  const float* kb = a.k + b * a.k_sb + h * a.k_sh;
  const char* mrow = nullptr;
  if (a.mask_kind != MaskKind::None) {
    const int64_t elem = a.mask_kind == MaskKind::Bool ? 1 : 4;
    mrow = static_cast<const char*>(a.mask) + (b * a.m_sb + h * a.m_sh + i * a.m_ss) * elem;
  }
  for (int64_t j = 0; j < a.sk; ++j) {
    if (a.causal && j > i) {
      s[j] = kNegInf;
      continue;
    }
    const float* kj = kb + j * a.k_ss;
    double dot = 0.0;
    for (int64_t e = 0; e < a.d; ++e) dot += static_cast<double>(qi[e]) * kj[e];
    float sij = static_cast<float>(a.scale * dot);
    if (a.mask_kind == MaskKind::Additive) {
      sij += reinterpret_cast<const float*>(mrow)[j * a.m_sk];
    } else if (a.mask_kind == MaskKind::Bool) {
      if (reinterpret_cast<const uint8_t*>(mrow)[j * a.m_sk] == 0) sij = kNegInf;
    }
    s[j] = sij;
  }
}

void attend_rows_scalar(const AttentionArgs& a, int64_t b, int64_t h, int64_t r0, int64_t r1, const Workspace& ws) {
  float* s = ws.s;
  // Sums in double: the specification is as accurate as float inputs allow, whatever Sk and D.
  std::vector<double> acc(static_cast<size_t>(a.dv));
  const float* vb = a.v + b * a.v_sb + h * a.v_sh;
  for (int64_t i = r0; i < r1; ++i) {
    score_row(a, b, h, i, s);
    // A NaN score never wins the max; its exp is NaN, which then poisons the row.
    float m = kNegInf;
    for (int64_t j = 0; j < a.sk; ++j) m = s[j] > m ? s[j] : m;
    const float base = m == kNegInf ? 0.0f : m;  // fully masked row: every p is exp(-inf) = 0
    double sum = 0.0;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t j = 0; j < a.sk; ++j) {
      const double p = std::exp(static_cast<double>(s[j]) - base);
      sum += p;
      if (p == 0.0f) continue;  // exactly-zero weights (masked keys) are skipped
      const float* vj = vb + j * a.v_ss;
      for (int64_t e = 0; e < a.dv; ++e) acc[e] += p * vj[e];
    }
    float* out = a.out + ((b * a.sq + i) * a.heads + h) * a.dv;
    for (int64_t e = 0; e < a.dv; ++e) out[e] = sum == 0.0 ? 0.0f : static_cast<float>(acc[e] / sum);
  }
}

void exp2_n_scalar(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::exp2(x[i]);
}

}  // namespace

const Kernels& kernels_scalar() {
  static const Kernels k{true, attend_rows_scalar, exp2_n_scalar};
  return k;
}

}  // namespace attention
}  // namespace pycompress
