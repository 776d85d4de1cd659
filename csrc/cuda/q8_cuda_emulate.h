// The CUDA int8 linear's algorithm on the CPU (q8_gemm_mma_emulate.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/q4_cuda_tiling.h"
#include "cuda/q8_cuda_tiling.h"
#include "cuda/q8_nm24_tiling.h"

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
  bool wgmma = false;  // a device that runs the Hopper tile (plan())
  // q4_emulate: the 4-bit pack instead of w / col_sum / w_scale (csrc/q4/q4_gemm.h).
  const uint8_t* w4 = nullptr;
  const float* g_scale = nullptr;
  const float* corr = nullptr;
  int64_t groups = 1;
};

// The quantizer kernel's output: each row of x quantized (stride ldq, zero past K), its scale, zero point and
// non-finite flag.
struct QuantizedRows {
  int64_t ldq;
  std::vector<uint8_t> q, nonfinite;
  std::vector<float> scale;
  std::vector<int32_t> zp;
};
QuantizedRows quantize_rows(const EmulateArgs& args);

// The epilogue of output (row, col) from its exact int32 sum, into args.y (or args.raw).
void store_output(const EmulateArgs& args, const QuantizedRows& rows, int32_t acc, int64_t row, int64_t col);

// Throws std::logic_error unless every output was written exactly once (writes: [m * n] counts).
void check_written_once(const EmulateArgs& args, const std::vector<int>& writes);

// "" on success (plan: the launch it emulated), else why the plan refuses the shape.
// Throws std::logic_error when the algorithm reads out of bounds or writes an output other than once.
std::string emulate(const EmulateArgs& args, Plan* plan);

// The W4A8 kernel (q4_gemm_mma__sm80.cu) over args.w4 / g_scale / corr / groups; the same returns and checks.
std::string q4_emulate(const EmulateArgs& args, Q4Plan* plan);

// The 2:4 kernel (q8_nm24_mma__sm80.cu) over `pack` (nm24_pack of args.w, `pack_bytes` long) instead of args.w;
// the same returns and checks.
std::string nm24_emulate(const EmulateArgs& args, const uint8_t* pack, int64_t pack_bytes, Nm24Plan* plan);

}  // namespace q8cuda
}  // namespace pycompress
