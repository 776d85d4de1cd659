// Sparse float linear over the CPU's csr pack (row_ptr over output channels, uint16 column indices, float32
// values) or its nm24 pack (2:4: K/2 values a channel, 2-bit indices in uint32 words, csrc/sparse/sparse.h):
// one warp per output channel, csr channels taken in the row_order given (Sputnik's row swizzle: nonzero counts
// decreasing, so a block's 8 warps have near-equal work; nm24 channels all hold K/2 values and go in order), each
// lane a stride of the channel's stored values gathering x[m][col] for
// kSparseRows rows a pass, float32 sums (fused multiply-add) reduced across the warp, then bias and the
// activation as the CPU's epilogue computes them. The order of the sums differs from the CPU kernels', so the
// result is checked against a float64 reference, not bit for bit (the int8 kernels are exact).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/q8_cuda.h"
#include "cuda/q8_cuda_device.cuh"
#include "cuda/q8_cuda_tiling.h"

namespace pycompress {
namespace q8cuda {
namespace {

// The pack a kernel instance reads (tag types: they name the instances in ptxas reports).
struct Csr {};
struct Nm24 {};

struct CsrArgs {
  const void* x;
  int64_t m, n, ldx;
  const int32_t* row_ptr;   // csr
  const uint16_t* col_idx;  // csr
  const uint32_t* nm_idx;   // nm24: [n][words]
  int64_t words, half_k;    // nm24: index words and stored values (K / 2) a channel
  const float* values;
  const int32_t* row_order;  // csr: warp slot -> output channel (a permutation of [0, n)); nm24: nullptr
  const float* bias;
  int act;
  void* y;
  int64_t ldy;
};

template <class P, typename T>
__global__ void __launch_bounds__(kSparseWarps * 32) sparse_f32_rows(CsrArgs s) {
  constexpr bool kCsr = std::is_same_v<P, Csr>;
  const int lane = threadIdx.x & 31;
  int64_t n;
  if (!sparse_channel(s.row_order, s.n, &n)) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kSparseRows;
  const int rows = sparse_rows_in_pass(s.m, m0);
  const T* x = static_cast<const T*>(s.x) + m0 * s.ldx;
  float acc[kSparseRows];
#pragma unroll
  for (int r = 0; r < kSparseRows; ++r) acc[r] = 0.0f;
  // The channel's stored values: j in [0, count) is values[j] at column col(j).
  const int64_t begin = kCsr ? s.row_ptr[n] : n * s.half_k;
  const int32_t count = static_cast<int32_t>(kCsr ? s.row_ptr[n + 1] - begin : s.half_k);  // <= K <= 65536
  const float* values = s.values + begin;
  const uint16_t* col_idx = kCsr ? s.col_idx + begin : nullptr;
  const uint32_t* nm_idx = kCsr ? nullptr : s.nm_idx + n * s.words;
  for (int32_t j = lane; j < count; j += 32) {
    const float w = values[j];
    int32_t col;
    if constexpr (kCsr) {
      col = col_idx[j];
    } else {
      col = nm24_col(nm_idx, j);
    }
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

template <class P, typename T>
std::string launch(const LinearArgs& a, const SparsePlan& p) {
  CsrArgs s{a.x, a.m, a.n, a.ldx, a.row_ptr, a.blk_idx, a.nm_idx, a.nm_words, a.k / 2, a.f32_values, a.row_order,
            a.bias, a.act, a.y, a.ldy};
  const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y));
  sparse_f32_rows<P, T><<<grid, kSparseWarps * 32, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(s);
  return launch_error("sparse_f32_rows");
}

}  // namespace

std::string sparse_f32_linear(const LinearArgs& a) {
  SparsePlan p;
  const char* why = nullptr;
  if (!sparse_plan(a.m, a.n, a.k, &p, &why)) return why;
  if (a.m == 0) return "";
  if (a.ldx < a.k || a.ldy < a.n) return "row strides below the row lengths";
  if (a.nm_idx != nullptr) {
    if (a.k % 4 != 0 || a.nm_words != (a.k / 2 + 15) / 16) return "an nm24 pack needs K % 4 == 0 and ceil(K / 32) index words";
    return with_dtype(a.dtype, [&](auto t) { return launch<Nm24, decltype(t)>(a, p); });
  }
  if (a.row_order == nullptr) return "no row order (the channels' permutation by nonzero count)";
  return with_dtype(a.dtype, [&](auto t) { return launch<Csr, decltype(t)>(a, p); });
}

}  // namespace q8cuda
}  // namespace pycompress
