// The CUDA int8 linear's algorithm on the CPU (q8_gemm_mma_emulate.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/epilogue_math.h"
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
  // sparse_q8_emulate / sparse_f32_emulate: the CPU's sparse packs instead of w. bsr1x4 (row_ptr over blocks,
  // blk_idx, values: 4 int8 a block), csr (row_ptr, blk_idx as column indices, f32_values) or nm24 (nm_idx,
  // nm_words index words a channel, f32_values [n][k / 2]); `stored`: the blocks / values the pack holds (the
  // bound every read is checked against); row_order as the kernels take the channels (nullptr: in order).
  const int32_t* row_ptr = nullptr;
  const uint16_t* blk_idx = nullptr;
  const int8_t* values = nullptr;
  const float* f32_values = nullptr;
  const uint32_t* nm_idx = nullptr;
  int64_t nm_words = 0, stored = 0;
  const int32_t* row_order = nullptr;
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

// The steps every int8-activation kernel ends with (q8_cuda_device.cuh, Epilogue::finish): NaN for a row that held
// a non-finite value, else dequantized(), the bias and the activation, into args.y.
template <class Dequantized>
void finish_output(const EmulateArgs& a, const QuantizedRows& qr, int64_t row, int64_t col,
                   Dequantized&& dequantized) {
  float v;
  if (qr.nonfinite[row]) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else {
    v = dequantized();
    if (a.bias != nullptr) v = v + a.bias[col];
    v = apply_activation(v, static_cast<Activation>(a.act));
  }
  a.y[row * a.n + col] = v;
}

// A T read at byte `offset` of a buffer of `size` bytes, as a kernel's aligned load: std::logic_error naming `what`
// when it would leave the buffer or is misaligned (every emulation reads through this).
template <typename T>
T checked_load(const uint8_t* base, int64_t size, int64_t offset, const char* what) {
  if (offset < 0 || offset + static_cast<int64_t>(sizeof(T)) > size || offset % static_cast<int64_t>(sizeof(T)) != 0)
    throw std::logic_error(std::string("CUDA emulation: a load of ") + what + " is out of bounds or misaligned at byte " +
                           std::to_string(offset));
  T v;
  std::memcpy(&v, base + offset, sizeof(T));
  return v;
}

// mma.m16n8k32.row.col.s32.<TA>.<TB>.s32 over one warp's registers (TA, TB: uint8_t or int8_t, the operands'
// byte types), through the fragment layouts of q8_cuda_tiling.h.
template <typename TA, typename TB>
void mma_m16n8k32_warp(int32_t (&acc)[32][4], const uint32_t (&a)[32][4], const uint32_t (&b)[32][2]) {
  int32_t A[kMmaM][kMmaK] = {}, B[kMmaK][kMmaN] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 4; ++j)
        A[a_frag_row(lane, r)][a_frag_k(lane, r) + j] = static_cast<TA>(static_cast<uint8_t>(a[lane][r] >> (8 * j)));
    for (int r = 0; r < 2; ++r)
      for (int j = 0; j < 4; ++j)
        B[b_frag_k(lane, r) + j][b_frag_n(lane)] = static_cast<TB>(static_cast<uint8_t>(b[lane][r] >> (8 * j)));
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 4; ++e) {
      int32_t s = 0;
      for (int k = 0; k < kMmaK; ++k) s += A[c_frag_row(lane, e)][k] * B[k][c_frag_col(lane, e)];
      acc[lane][e] += s;
    }
}

// Throws std::logic_error unless every output was written exactly once (writes: [m * n] counts).
void check_written_once(const EmulateArgs& args, const std::vector<int>& writes);

// "" on success (plan: the launch it emulated), else why the plan refuses the shape.
// Throws std::logic_error when the algorithm reads out of bounds or writes an output other than once.
std::string emulate(const EmulateArgs& args, Plan* plan);

// The W4A8 kernel (q4_gemm_mma__sm80.cu) over args.w4 / g_scale / corr / groups; the same returns and checks.
std::string q4_emulate(const EmulateArgs& args, Q4Plan* plan);

// The sparse kernels (q8_sparse_rows__sm61.cu: bsr1x4 int8, bit-identical to the dense reference;
// sparse_f32_rows__sm61.cu: csr or nm24 float, the kernel's own float32 sum order, so the GPU's bits exactly).
std::string sparse_q8_emulate(const EmulateArgs& args);
std::string sparse_f32_emulate(const EmulateArgs& args);

// The 2:4 kernel (q8_nm24_mma__sm80.cu) over `pack` (nm24_pack of args.w, `pack_bytes` long) instead of args.w;
// the same returns and checks.
std::string nm24_emulate(const EmulateArgs& args, const uint8_t* pack, int64_t pack_bytes, Nm24Plan* plan);

}  // namespace q8cuda
}  // namespace pycompress
