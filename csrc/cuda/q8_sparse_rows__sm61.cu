// Sparse int8 linear over the CPU's bsr1x4 pack (row_ptr over output channels, blk_idx, values: 1 x 4 int8
// blocks along K): one warp per output channel, each lane a stride of its blocks, `dp4a` u8 x s8 -> s32 (exact)
// against the quantized activation rows of a row group, a warp reduction, then the dense kernel's epilogue. The
// sums are exact int32, so the output equals the dense int8 kernel's (and the CPU's) bit for bit, whatever the
// order of the blocks. Built for the decode rows (M up to a few tens): one pass per kSparseRows rows, each block
// read once per pass. Sputnik's row swizzle: warps take the channels in the order row_order gives (their block
// counts decreasing, pycompress/ops/sparse.py), so the 8 warps of a block have near-equal work and the longest
// channels start first. Not yet: shared-memory staging of the activations (read through L1).
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

struct SparseArgs {
  const uint8_t* q;  // quantized rows, stride ldq
  int64_t m, n, ldq;
  const int32_t* row_ptr;
  const uint16_t* blk_idx;
  const int8_t* values;
  const int32_t* row_order;  // warp slot -> output channel (a permutation of [0, n))
  Epilogue out;
};

__device__ __forceinline__ int32_t dp4a_u8s8(uint32_t a, uint32_t b, int32_t c) {
  int32_t d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <typename OutT>
__global__ void __launch_bounds__(kSparseWarps * 32) q8_sparse_rows(SparseArgs s) {
  const int lane = threadIdx.x & 31;
  int64_t n;
  if (!sparse_channel(s.row_order, s.n, &n)) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kSparseRows;
  const int rows = sparse_rows_in_pass(s.m, m0);
  int32_t acc[kSparseRows];
#pragma unroll
  for (int r = 0; r < kSparseRows; ++r) acc[r] = 0;
  const int32_t end = s.row_ptr[n + 1];
  for (int32_t j = s.row_ptr[n] + lane; j < end; j += 32) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(s.values + 4 * static_cast<int64_t>(j));
    const uint8_t* a = s.q + m0 * s.ldq + 4 * static_cast<int64_t>(s.blk_idx[j]);
#pragma unroll
    for (int r = 0; r < kSparseRows; ++r)
      if (r < rows) acc[r] = dp4a_u8s8(__ldg(reinterpret_cast<const uint32_t*>(a + r * s.ldq)), w, acc[r]);
  }
#pragma unroll
  for (int r = 0; r < kSparseRows; ++r)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
  // Lane r writes row m0 + r.
#pragma unroll
  for (int r = 0; r < kSparseRows; ++r) {
    if (lane == r && r < rows) s.out.store<OutT>(acc[r], m0 + r, n);
  }
}

template <typename OutT>
std::string launch_sparse(const LinearArgs& a, const SparsePlan& p) {
  const uint8_t* q = static_cast<const uint8_t*>(a.scratch) + scratch_layout(a.m, a.k).q;
  SparseArgs s{q, a.m, a.n, q_ld(a.k), a.row_ptr, a.blk_idx, a.values, a.row_order, epilogue_of(a)};
  const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y));
  q8_sparse_rows<OutT><<<grid, kSparseWarps * 32, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(s);
  return launch_error("q8_sparse_rows");
}

}  // namespace

std::string sparse_linear(const LinearArgs& a) {
  SparsePlan p;
  const char* why = nullptr;
  if (!sparse_plan(a.m, a.n, a.k, &p, &why)) return why;
  if (a.m == 0) return "";
  if (reinterpret_cast<std::uintptr_t>(a.values) % 4 != 0) return "the sparse values must be 4-byte aligned";
  if (a.row_order == nullptr) return "no row order (the channels' permutation by block count)";
  std::string err = quantize(a);
  if (!err.empty()) return err;
  return with_dtype(a.dtype, [&](auto t) { return launch_sparse<decltype(t)>(a, p); });
}

}  // namespace q8cuda
}  // namespace pycompress
