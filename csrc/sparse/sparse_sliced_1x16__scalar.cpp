// Portable scalar kernel of both sliced layouts (sparse.h), tile 1 row x 16
// output channels (one slice): the executable specification of the group and
// the byte layout, and the byte layout's kernel on every level without vpermb.
#include "sparse/sparse_epilogue.h"
#include "sparse/sparse_kernels.h"

namespace pycompress {
namespace sparse {

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


}  // namespace sparse
}  // namespace pycompress
