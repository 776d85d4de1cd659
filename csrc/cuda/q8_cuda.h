// Host interface of the CUDA int8 linear (no CUDA types: included by the
// pybind11 bindings, compiled by the host compiler). The contract is the CPU's
// (csrc/q8/q8_gemm.h); the tiling is q8_cuda_tiling.h.
#pragma once

#include <cstdint>
#include <string>

namespace pycompress {
namespace q8cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };  // x's and y's element type

struct LinearArgs {
  const void* x;      // [m, k] rows at stride ldx (elements), elements contiguous
  DType dtype;
  int64_t m, k, ldx;
  const int8_t* w;    // packed [Np/16][Kp/4][16][4], 16-byte aligned
  const int32_t* col_sum;
  const float* w_scale;
  const float* bias;  // nullable
  int64_t n;
  void* y;            // [m, n] rows at stride ldy (elements), same dtype as x
  int64_t ldy;
  int act;            // Activation code of epilogue_math.h
  bool is_static;
  float static_scale;
  int32_t static_zp;
  int32_t qmax;       // 255 (u8) or 127 (u7)
  void* scratch;      // scratch_bytes(m, n, k, sms) bytes of device memory, 16-byte aligned
  int64_t scratch_size;
  int32_t* raw;       // nullable: int32 accumulators [m, n] instead of y (tests)
  std::uintptr_t stream;  // cudaStream_t of the caller (torch's current stream)
  // Sparse weights instead of w (sparse_linear): the CPU's bsr1x4 pack, validated on the host first.
  const int32_t* row_ptr = nullptr;  // [n + 1]
  const uint16_t* blk_idx = nullptr; // [blocks]: block g covers k = 4g .. 4g + 3
  const int8_t* values = nullptr;    // [blocks * 4], 4-byte aligned
  // Float sparse weights (sparse_f32_linear): the CPU's csr pack, row_ptr [n + 1], col_idx [nnz] (in blk_idx's
  // place: one k each) and float values [nnz]; no activation quantization (scratch unused).
  const float* f32_values = nullptr;
  // Both sparse kernels: the output channels in the order warps take them, a permutation of [0, n) by nonzero
  // count, decreasing (Sputnik's row swizzle), computed by pycompress/ops/sparse.py from the validated row_ptr.
  const int32_t* row_order = nullptr;
  // Float 2:4 weights (sparse_f32_linear): the CPU's nm24 pack, f32_values [n][k / 2] and these 2-bit indices
  // [n][nm_words] (csrc/sparse/sparse.h) instead of row_ptr / blk_idx; no row order (every channel holds k / 2).
  const uint32_t* nm_idx = nullptr;
  int64_t nm_words = 0;
  // The device's multiprocessor count: the dense kernel's split-K (q8_cuda_tiling.h, plan); 0 = no split.
  int64_t sms = 0;
  // The device runs the Hopper wgmma tile (compute capability 9.0 and this module built for sm_90a).
  bool wgmma = false;
  // 4-bit weights instead of w (q4_linear): the CPU's w4 pack, its group scales [Np/16][groups][16] and zero-point
  // corrections [Np] (csrc/q4/q4_gemm.h).
  const uint8_t* w4 = nullptr;
  const float* g_scale = nullptr;
  const float* corr = nullptr;
  int64_t groups = 1;
  // 2:4 sparse int8 weights instead of w (nm24_linear): q8_nm24_tiling.h's GPU pack (nm24_layout(n, k).total
  // bytes, 16-byte aligned), made on the host from w by nm24_pack.
  const void* nm24 = nullptr;
};

// Device scratch of one call on a device of `sms` multiprocessors (and the Hopper tile or not) (q8_cuda_tiling.h, scratch_layout): quantized
// rows, per-row scale, zero point and non-finite flag, and the dense kernel's split-K partial sums and counters.
// Enough for every kernel of this header.
int64_t scratch_bytes(int64_t m, int64_t n, int64_t k, int64_t sms, bool wgmma);

// Launches the quantization and the GEMM on args.stream. Returns "" on success,
// else what went wrong (nothing was launched when the plan or the operands are refused).
std::string linear(const LinearArgs& args);

// The same linear over bsr1x4 sparse weights (q8_sparse_rows__sm61.cu): bit-identical to linear() on the
// same weights (exact int32 accumulation, the same epilogue).
std::string sparse_linear(const LinearArgs& args);

// The same linear over 2:4 sparse int8 weights (q8_nm24_mma__sm80.cu, sparse tensor cores): bit-identical to
// linear() on the dense weights the pack was made from.
std::string nm24_linear(const LinearArgs& args);

// The W4A8 linear over the CPU's 4-bit pack (q4_gemm_mma__sm80.cu): the CPU's contract (csrc/q4/q4_gemm.h) bit
// for bit, the groups folded in order; groups of a multiple of 32 k or one group per channel.
std::string q4_linear(const LinearArgs& args);

// y = act(x @ W^T + b) over csr float weights, or nm24 ones when nm_idx is set (sparse_f32_rows__sm61.cu):
// float32 sums, not bit-identical to the CPU kernels (which sum in their own order); checked against a float64
// reference.
std::string sparse_f32_linear(const LinearArgs& args);

// The per-row activation quantization into args.scratch (scratch_layout), on args.stream.
std::string quantize(const LinearArgs& args);

// The devices this module can use: count, or a negative count with the reason.
struct DeviceStatus {
  int count;
  std::string reason;
};
DeviceStatus device_status();
std::string device_name(int device, int* major, int* minor);

}  // namespace q8cuda
}  // namespace pycompress
