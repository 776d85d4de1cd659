// Scalar epilogues of the sparse kernels (the specification; the vector paths
// perform the same IEEE float operations in the same order). Internal linkage
// for the same reason as common/epilogue_math.h: included from translation
// units with different ISA flags.
#pragma once

#include <cstdint>

#include "common/epilogue_math.h"
#include "sparse/sparse.h"

namespace pycompress {
namespace sparse {
namespace {

inline float f32_epilogue(float acc, const float* bias, int64_t n, Activation act) {
  float v = acc;
  if (bias != nullptr) v = v + bias[n];
  return apply_activation(v, act);
}

// Wrapping arithmetic: the exact result fits int32 even when zp * col_sum
// alone is close to the limit (as in the dense int8 GEMM).
inline float q8_epilogue(int32_t acc, int32_t zp, int32_t col_sum, float row_scale, float w_scale,
                         const float* bias, int64_t n, Activation act) {
  const int32_t corrected = static_cast<int32_t>(static_cast<uint32_t>(acc) -
                                                 static_cast<uint32_t>(zp) * static_cast<uint32_t>(col_sum));
  float v = static_cast<float>(corrected);
  v = v * (row_scale * w_scale);
  if (bias != nullptr) v = v + bias[n];
  return apply_activation(v, act);
}

// Row r, channel n of an int8 task (Q8Task or SlicedTask): the raw sum, or its epilogue.
template <class Task>
inline void q8_store_scalar(const Task& t, int64_t r, int64_t n, int32_t acc) {
  if (t.raw != nullptr) {
    t.raw[r * t.ldraw + n] = acc;
    return;
  }
  t.y[r * t.ldy + n] = q8_epilogue(acc, t.row_zp[r], t.w->col_sum[n], t.row_scale[r], t.w->w_scale[n], t.bias, n,
                                   t.act);
}

}  // namespace
}  // namespace sparse
}  // namespace pycompress
