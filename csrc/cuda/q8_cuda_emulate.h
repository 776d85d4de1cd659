// The CUDA int8 linear's algorithm on the CPU (q8_gemm_mma_emulate.cpp).
#pragma once

#include <cstdint>
#include <string>

#include "cuda/q8_cuda_tiling.h"

namespace pycompress {
namespace q8cuda {

struct EmulateArgs {
  const float* x;  // [m, k], row stride ldx
  int64_t m, k, ldx;
  const int8_t* w;  // packed weights of N = n
  const int32_t* col_sum;
  const float* w_scale;
  const float* bias;  // nullable
  int64_t n;
  float* y;      // [m, n] contiguous
  int32_t* raw;  // nullable: [m, n] int32 accumulators instead of y
  int act;
  bool is_static;
  float static_scale;
  int32_t static_zp, qmax;
  int64_t sms;  // the multiprocessor count the plan splits K for (0: no split)
};

// "" on success (plan: the launch it emulated), else why the plan refuses the shape.
// Throws std::logic_error when the algorithm reads out of bounds or writes an output other than once.
std::string emulate(const EmulateArgs& args, Plan* plan);

}  // namespace q8cuda
}  // namespace pycompress
