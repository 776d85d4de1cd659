// Portable scalar path: the executable specification of q4_gemm.h.
#include "q4/q4_gemm.h"

namespace pycompress {
namespace q4 {
namespace {

inline int32_t nibble(uint8_t byte, bool high) { return (high ? byte >> 4 : byte & 0xF) - kNibbleBias; }

void gemm_tile_scalar(const Tile& t) {
  const int64_t gk = t.kp / t.groups;
  for (int64_t r = 0; r < t.m; ++r) {
    const uint8_t* a = t.a + r * t.lda;
    for (int64_t c = 0; c < t.ncols; ++c) {
      const int64_t n = t.n0 + c;
      const int64_t p = n / kPanel, lane = n % kPanel;
      const uint8_t* panel = t.w + p * (t.kp / kKBlock) * kBlockBytes;
      const float* scales = t.g_scale + p * t.groups * kPanel + lane;
      float facc = 0.0f;
      for (int64_t g = 0; g < t.groups; ++g) {
        int32_t acc = 0;
        for (int64_t kb = g * gk / kKBlock; kb < (g + 1) * gk / kKBlock; ++kb) {
          const uint8_t* w = panel + kb * kBlockBytes + lane * 4;
          const uint8_t* av = a + kb * kKBlock;
          for (int j = 0; j < 4; ++j) {
            acc += static_cast<int32_t>(av[j]) * nibble(w[j], false);
            acc += static_cast<int32_t>(av[4 + j]) * nibble(w[j], true);
          }
        }
        facc = facc + static_cast<float>(acc) * scales[g * kPanel];
      }
      float v = facc - static_cast<float>(t.row_zp[r]) * t.corr[n];
      v = v * t.row_scale[r];
      if (t.bias != nullptr) v = v + t.bias[n];
      t.y[r * t.ldy + n] = apply_activation(v, t.act);
    }
  }
}

}  // namespace

const Kernels& kernels_scalar() {
  static const Kernels k{gemm_tile_scalar};
  return k;
}

}  // namespace q4
}  // namespace pycompress
