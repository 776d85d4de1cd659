// Helpers of the CUDA kernel files (q8_gemm_mma__sm80.cu, q8_sparse_rows__sm61.cu, sparse_f32_rows__sm61.cu):
// element conversions and the int8 epilogue, the CPU's operations (epilogue_math.h, q8_gemm.h) in
// round-to-nearest intrinsics; the launchers' dtype switch and launch-error check. Internal linkage: each
// kernel file gets its own copy (and its own constant-memory table).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/epilogue_math.h"
#include "cuda/q8_cuda.h"
#include "cuda/q8_cuda_tiling.h"

namespace pycompress {
namespace q8cuda {
namespace {

// GELU's table in constant memory, initialised from the CPU's constexpr copy.
__constant__ gelu_c::Table kGeluTable = gelu_c::kTableData;

// epilogue_math.h's gelu, operation for operation.
__device__ __forceinline__ float gelu_device(float x) {
  float s = __fmul_rn(fabsf(x), gelu_c::kScale);
  s = s < gelu_c::kMaxIndex ? s : gelu_c::kMaxIndex;
  const float n = rintf(s);
  const float t = __fsub_rn(s, n);
  const int i = static_cast<int>(n);
  float e = kGeluTable.v[gelu_c::kDegree][i];
#pragma unroll
  for (int j = gelu_c::kDegree - 1; j >= 0; --j) e = __fadd_rn(__fmul_rn(e, t), kGeluTable.v[j][i]);
  const float phi = x >= 0.0f ? __fsub_rn(1.0f, e) : e;
  return __fmul_rn(x, phi);
}

__device__ __forceinline__ float activation(float v, int act) {
  if (act == static_cast<int>(Activation::Relu)) return v > 0.0f ? v : 0.0f;
  if (act == static_cast<int>(Activation::Gelu)) return gelu_device(v);
  return v;
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sets *channel to the output channel this warp of a sparse kernel computes (kSparseWarps warps a block, taking
// the channels in row_order: Sputnik's row swizzle; in order when row_order is nullptr); false for a warp past
// the last one.
__device__ __forceinline__ bool sparse_channel(const int32_t* row_order, int64_t n, int64_t* channel) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kSparseWarps + (threadIdx.x >> 5);
  if (slot >= n) return false;
  *channel = row_order != nullptr ? row_order[slot] : slot;
  return true;
}

// The epilogue's operands: per row (from the quantizer's scratch), per output channel (the layer), and where
// the outputs go: y (OutT, row stride ldy) or, when raw is set, the int32 accumulators (tests).
struct Epilogue {
  const float* row_scale;
  const int32_t* row_zp;
  const uint8_t* nonfinite;
  const int32_t* col_sum;
  const float* w_scale;
  const float* bias;  // nullable
  int act;
  void* y;
  int64_t ldy;
  int32_t* raw;

  // Output (row, col) from its exact accumulator: NaN for a row that held a non-finite value, else the CPU's
  // epilogue (q8_gemm.h), in the output type.
  template <typename OutT>
  __device__ __forceinline__ void store(int32_t acc, int64_t row, int64_t col) const {
    if (raw != nullptr) {
      raw[row * ldy + col] = acc;
      return;
    }
    finish<OutT>(row, col, [&] { return dequantize(acc, row_zp[row], col_sum[col], row_scale[row], w_scale[col]); });
  }

  // The steps every int8-activation kernel ends with: NaN for a row that held a non-finite value, else
  // dequantized() (the kernel's own dequantization of its sums), the bias and the activation, in the output type.
  template <typename OutT, class Dequantized>
  __device__ __forceinline__ void finish(int64_t row, int64_t col, Dequantized&& dequantized) const {
    float v;
    if (nonfinite[row]) {
      v = __int_as_float(0x7fc00000);  // the CPU's quiet NaN
    } else {
      v = dequantized();
      if (bias != nullptr) v = __fadd_rn(v, bias[col]);
      v = activation(v, act);
    }
    static_cast<OutT*>(y)[row * ldy + col] = from_float<OutT>(v);
  }
};

// ---- the dense GEMM kernels' shared parts (q8_gemm_mma__sm80.cu, q8_gemm_wgmma__sm90a.cu) ----------------
struct GemmArgs {
  const uint8_t* q;
  const int8_t* w;
  int64_t m, n, ldq, kp, panels;
  int64_t steps, steps_per_split, splits;
  int32_t* partial;   // splits > 1: [splits][m][n] int32 partial sums
  int32_t* counters;  // splits > 1: one per output tile, zero at launch
  Epilogue out;
};

__device__ __forceinline__ void cp_async16(uint8_t* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? kChunk : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async4(uint8_t* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Split-K (plan(): blockIdx.z is the split): publishes this block's int32 sums, and in the tile's last block to
// arrive replaces its own accumulators by the sum over every split (exact, wrapping as the CPU's int32 sums);
// returns whether this block is that one and so runs the epilogue. for_each_output(f) calls f(accumulator, row,
// col) for each of the thread's accumulators inside the output. Every thread of the block calls it.
// Split-K's arrival, once this block's partial sums are stored: whether it is the tile's last split to arrive
// (then every split's sums are visible to it). Every thread of the block calls it.
__device__ __forceinline__ bool split_k_arrive(const GemmArgs& g) {
  __threadfence();  // the partial sums are visible device-wide before this block is counted
  __syncthreads();
  __shared__ int last;
  if (threadIdx.x == 0) {
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    last = atomicAdd(g.counters + tile, 1) == static_cast<int>(g.splits) - 1;
  }
  __syncthreads();
  if (!last) return false;
  __threadfence();  // the other splits' sums, published before their arrivals, are read after ours
  return true;
}

template <class ForEach>
__device__ __forceinline__ bool split_k_last(const GemmArgs& g, ForEach&& for_each_output) {
  if (g.splits <= 1) return true;
  const int64_t z = blockIdx.z;
  for_each_output([&](int32_t& v, int64_t row, int64_t col) { g.partial[(z * g.m + row) * g.n + col] = v; });
  if (!split_k_arrive(g)) return false;
  for_each_output([&](int32_t& v, int64_t row, int64_t col) {
    uint32_t sum = 0;
#pragma unroll 1  // (unrolled, this loop in each of a tile's unrolled accumulators made ptxas take 6x longer)
    for (int64_t s = 0; s < g.splits; ++s)
      sum += static_cast<uint32_t>(s == z ? v : __ldcg(g.partial + (s * g.m + row) * g.n + col));
    v = static_cast<int32_t>(sum);
  });
  return true;
}

// launch(T{}) for the element type of `dtype` (float, __half, __nv_bfloat16): the one dtype switch of the
// launchers. `launch` returns what the launcher returns ("" or an error).
template <typename Launch>
std::string with_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::F32: return launch(float{});
    case DType::F16: return launch(__half{});
    case DType::BF16: return launch(__nv_bfloat16{});
  }
  return "unknown dtype code";
}

// "" when the last launch on this thread was accepted, else why `kernel` was not launched.
inline std::string launch_error(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : std::string(kernel) + " launch failed: " + cudaGetErrorString(err);
}

// The epilogue of a call: its per-row operands in the scratch the quantizer filled (scratch_layout).
inline Epilogue epilogue_of(const LinearArgs& a) {
  const Scratch sl = scratch_layout(a.m, a.k);  // the per-row part: the same at any split count
  const uint8_t* base = static_cast<const uint8_t*>(a.scratch);
  return Epilogue{reinterpret_cast<const float*>(base + sl.scale), reinterpret_cast<const int32_t*>(base + sl.zp),
                  base + sl.nonfinite, a.col_sum, a.w_scale, a.bias, a.act, a.y, a.ldy, a.raw};
}

// The dense GEMM's arguments for plan p: the quantized rows and split-K buffers in the scratch.
inline GemmArgs gemm_args(const LinearArgs& a, const Plan& p) {
  const Scratch sl = scratch_layout(a.m, a.n, p);
  uint8_t* base = static_cast<uint8_t*>(a.scratch);
  return GemmArgs{base + sl.q, a.w, a.m, a.n, p.ldq, p.kp, p.panels, p.steps, p.steps_per_split, p.splits,
                  reinterpret_cast<int32_t*>(base + sl.partial), reinterpret_cast<int32_t*>(base + sl.counters),
                  epilogue_of(a)};
}

}  // namespace

// The Hopper tile's GEMM launch (q8_gemm_wgmma__sm90a.cu), after linear() has quantized the rows.
std::string wgmma_gemm(const LinearArgs& a, const Plan& p);

}  // namespace q8cuda
}  // namespace pycompress
