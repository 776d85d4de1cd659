// Portable scalar path: the executable specification of q8_gemm.h.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "q8/q8_gemm.h"

namespace pycompress {
namespace q8 {
namespace {

inline int32_t quantize_value(float x, float inv_scale, int32_t zp, int32_t qmax) {
  float v = x * inv_scale;
  v = v < -256.0f ? -256.0f : (v > 256.0f ? 256.0f : v);
  const int32_t q = static_cast<int32_t>(std::nearbyint(v)) + zp;
  return q < 0 ? 0 : (q > qmax ? qmax : q);
}

void quantize_rows_scalar(const QuantizeRows& p) {
  quantize_rows_with(
      p,
      [](const float* x, int64_t len, float* lo, float* hi, float* probe) {
        // x - x is 0 for finite x and NaN otherwise; a sum of them flags the row.
        float nan_probe = 0.0f, l = 0.0f, h = 0.0f;
        for (int64_t k = 0; k < len; ++k) {
          nan_probe = nan_probe + (x[k] - x[k]);
          l = std::min(l, x[k]);
          h = std::max(h, x[k]);
        }
        *lo = l;
        *hi = h;
        *probe = nan_probe;
      },
      [](const float* x, int64_t len, uint8_t* q, float inv_scale, int32_t zp, int32_t qmax) {
        for (int64_t k = 0; k < len; ++k) q[k] = static_cast<uint8_t>(quantize_value(x[k], inv_scale, zp, qmax));
      });
}

void gemm_tile_scalar(const GemmTile& t) {
  for (int64_t r = 0; r < t.m; ++r) {
    const uint8_t* a = t.a + r * t.lda;
    for (int64_t c = 0; c < t.ncols; ++c) {
      const int64_t n = t.n0 + c;
      const int8_t* panel = t.w + (n / kPanel) * t.kp * kPanel;
      const int64_t lane = n % kPanel;
      int32_t acc = 0;
      for (int64_t g = 0; g < t.kp / kKGroup; ++g) {
        const int8_t* w = panel + (g * kPanel + lane) * kKGroup;
        const uint8_t* av = a + g * kKGroup;
        for (int j = 0; j < kKGroup; ++j) acc += static_cast<int32_t>(av[j]) * w[j];
      }
      if (t.raw != nullptr) {
        t.raw[r * t.ldraw + n] = acc;
        continue;
      }
      // Wrapping arithmetic: the exact result fits int32 even when zp * colsum
      // alone is close to the limit.
      const int32_t corrected = static_cast<int32_t>(
          static_cast<uint32_t>(acc) -
          static_cast<uint32_t>(t.row_zp[r]) * static_cast<uint32_t>(t.col_sum[n]));
      float v = static_cast<float>(corrected);
      const float s = t.row_scale[r] * t.w_scale[n];
      v = v * s;
      if (t.bias != nullptr) v = v + t.bias[n];
      t.y[r * t.ldy + n] = apply_activation(v, t.act);
    }
  }
}

}  // namespace

const Kernels& kernels_scalar() {
  static const Kernels k{quantize_rows_scalar, gemm_tile_scalar};
  return k;
}

}  // namespace q8
}  // namespace pycompress
