// Portable scalar rows kernels, tile 1 row x 1 output channel: the executable
// specification of sparse.h for fp32 (csr, nm24) and int8 (bsr1x4). The
// scalar level serves every M through these (no transposed activations).
#include "sparse/sparse_epilogue.h"
#include "sparse/sparse_kernels.h"

namespace pycompress {
namespace sparse {

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

}  // namespace sparse
}  // namespace pycompress
