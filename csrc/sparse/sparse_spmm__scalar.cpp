// Portable scalar path: the executable specification of sparse.h. It serves
// every M through the rows kernels (no transposed activations).
#include <cstring>

#include "sparse/sparse.h"
#include "sparse/sparse_epilogue.h"

namespace pycompress {
namespace sparse {
namespace {

void f32_rows_scalar(const F32Task& t) {
  const F32Weights& w = *t.w;
  const int64_t half_k = w.k / 2;
  for (int64_t r = 0; r < t.m; ++r) {
    const float* x = t.x + r * t.ldx;
    float* y = t.y + r * t.ldy;
    for (int64_t n = t.n0; n < t.n1; ++n) {
      float acc = 0.0f;
      if (w.format == Format::Csr) {
        for (int64_t j = w.row_ptr[n]; j < w.row_ptr[n + 1]; ++j) acc = acc + w.values[j] * x[w.col_idx[j]];
      } else {
        const float* v = w.values + n * half_k;
        const uint32_t* idx = w.nm_idx + n * w.nm_words;
        for (int64_t j = 0; j < half_k; ++j) acc = acc + v[j] * x[nm24_k(idx, j)];
      }
      y[n] = f32_epilogue(acc, t.bias, n, t.act);
    }
  }
}

void q8_rows_scalar(const Q8Task& t) {
  const Q8Weights& w = *t.w;
  for (int64_t r = 0; r < t.m; ++r) {
    const uint8_t* xq = t.xq + r * w.kp;
    for (int64_t n = t.n0; n < t.n1; ++n) {
      int32_t acc = 0;
      for (int64_t b = w.row_ptr[n]; b < w.row_ptr[n + 1]; ++b) {
        const uint8_t* a = xq + 4 * static_cast<int64_t>(w.blk_idx[b]);
        const int8_t* v = w.values + 4 * b;
        for (int j = 0; j < 4; ++j) acc += static_cast<int32_t>(a[j]) * v[j];
      }
      q8_store_scalar(t, r, n, acc);
    }
  }
}

// Both sliced layouts: slot i of a step (lane i / 4) multiplies values[i] by
// one activation byte of the step's window, found by the lane's group offset
// (group layout) or by the slot's own position (byte layout).
void q8_sliced_scalar(const SlicedTask& t) {
  const SlicedWeights& w = *t.w;
  for (int64_t s = t.s0; s < t.s1; ++s) {
    for (int64_t r = 0; r < t.m; ++r) {
      const uint8_t* xq = t.xq + r * t.ldq;
      int32_t acc[kSliceLanes] = {};
      for (int64_t j = w.slice_ptr[s]; j < w.slice_ptr[s + 1]; ++j) {
        const int8_t* v = w.values + 64 * j;
        for (int64_t i = 0; i < 4 * kSliceLanes; ++i) {
          const int64_t l = i / 4;
          const int64_t byte = w.step_pos != nullptr
                                   ? w.step_base[j] + (w.step_pos[64 * j + i] & 63u)
                                   : 4 * (w.step_base[j] + ((w.step_lane[2 * j + (l & 1)] >> (4 * (l >> 1))) & 15u)) + i % 4;
          acc[l] += static_cast<int32_t>(xq[byte]) * v[i];
        }
      }
      for (int64_t l = 0; l < kSliceLanes && s * kSliceLanes + l < w.n; ++l) {
        q8_store_scalar(t, r, s * kSliceLanes + l, acc[l]);
      }
    }
  }
}

}  // namespace

const Kernels& kernels_scalar() {
  static const Kernels k{f32_rows_scalar, nullptr, nullptr, nullptr, q8_rows_scalar, nullptr, nullptr, q8_sliced_scalar,
                         q8_sliced_scalar};
  return k;
}

}  // namespace sparse
}  // namespace pycompress
