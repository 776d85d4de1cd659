// Sparse float linear over the CPU's csr pack (row_ptr over output channels, uint16 column indices, float32
// values): one warp per output channel, taken in the row_order given (Sputnik's row swizzle: nonzero counts
// decreasing, so a block's 8 warps have near-equal work), each lane a stride of the channel's nonzeros gathering x[m][col] for
// kSparseRows rows a pass, float32 sums (fused multiply-add) reduced across the warp, then bias and the
// activation as the CPU's epilogue computes them. The order of the sums differs from the CPU kernels', so the
// result is checked against a float64 reference, not bit for bit (the int8 kernels are exact).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/q8_cuda.h"
#include "cuda/q8_cuda_device.cuh"
#include "cuda/q8_cuda_tiling.h"

namespace pycompress {
namespace q8cuda {
namespace {

struct CsrArgs {
  const void* x;
  int64_t m, n, ldx;
  const int32_t* row_ptr;
  const uint16_t* col_idx;
  const float* values;
  const int32_t* row_order;  // warp slot -> output channel (a permutation of [0, n))
  const float* bias;
  int act;
  void* y;
  int64_t ldy;
};

template <typename T>
__global__ void __launch_bounds__(kSparseWarps * 32) sparse_f32_rows(CsrArgs s) {
  const int lane = threadIdx.x & 31;
  int64_t n;
  if (!sparse_channel(s.row_order, s.n, &n)) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kSparseRows;
  const int rows = static_cast<int>(s.m - m0 < kSparseRows ? s.m - m0 : kSparseRows);
  const T* x = static_cast<const T*>(s.x) + m0 * s.ldx;
  float acc[kSparseRows];
#pragma unroll
  for (int r = 0; r < kSparseRows; ++r) acc[r] = 0.0f;
  const int32_t end = s.row_ptr[n + 1];
  for (int32_t j = s.row_ptr[n] + lane; j < end; j += 32) {
    const float w = s.values[j];
    const int64_t col = s.col_idx[j];
#pragma unroll
    for (int r = 0; r < kSparseRows; ++r)
      if (r < rows) acc[r] = __fmaf_rn(to_float(x[r * s.ldx + col]), w, acc[r]);
  }
#pragma unroll
  for (int r = 0; r < kSparseRows; ++r)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[r] = __fadd_rn(acc[r], __shfl_xor_sync(0xffffffffu, acc[r], o));
#pragma unroll
  for (int r = 0; r < kSparseRows; ++r) {
    if (lane != r || r >= rows) continue;
    float v = acc[r];
    if (s.bias != nullptr) v = __fadd_rn(v, s.bias[n]);
    static_cast<T*>(s.y)[(m0 + r) * s.ldy + n] = from_float<T>(activation(v, s.act));
  }
}

template <typename T>
std::string launch(const LinearArgs& a, const SparsePlan& p) {
  CsrArgs s{a.x, a.m, a.n, a.ldx, a.row_ptr, a.blk_idx, a.f32_values, a.row_order, a.bias, a.act, a.y, a.ldy};
  const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y));
  sparse_f32_rows<T><<<grid, kSparseWarps * 32, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(s);
  return launch_error("sparse_f32_rows");
}

}  // namespace

std::string sparse_f32_linear(const LinearArgs& a) {
  SparsePlan p;
  const char* why = nullptr;
  if (!sparse_plan(a.m, a.n, a.k, &p, &why)) return why;
  if (a.m == 0) return "";
  if (a.ldx < a.k || a.ldy < a.n) return "row strides below the row lengths";
  if (a.row_order == nullptr) return "no row order (the channels' permutation by nonzero count)";
  return with_dtype(a.dtype, [&](auto t) { return launch<decltype(t)>(a, p); });
}

}  // namespace q8cuda
}  // namespace pycompress
