// Device helpers of the CUDA int8 kernels (q8_gemm_mma__sm80.cu, q8_sparse_rows__sm61.cu): element
// conversions and the epilogue, the CPU's operations (epilogue_math.h, q8_gemm.h) in round-to-nearest
// intrinsics. Internal linkage: each kernel file gets its own copy (and its own constant-memory table).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/epilogue_math.h"
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

// One output of the int8 linear from its exact accumulator: NaN for a row that held a non-finite value, else
// the CPU's epilogue (q8_gemm.h), in the output type.
template <typename OutT>
__device__ __forceinline__ OutT epilogue(int32_t acc, bool nonfinite, int32_t zp, int32_t col_sum, float row_scale,
                                         float w_scale, const float* bias, int64_t col, int act) {
  float v;
  if (nonfinite) {
    v = __int_as_float(0x7fc00000);  // the CPU's quiet NaN
  } else {
    v = dequantize(acc, zp, col_sum, row_scale, w_scale);
    if (bias != nullptr) v = __fadd_rn(v, bias[col]);
    v = activation(v, act);
  }
  return from_float<OutT>(v);
}

}  // namespace
}  // namespace q8cuda
}  // namespace pycompress
