// W4A8 linear on int8 tensor cores (q4_gemm_mma__sm80.cu): the launch plan, the fragment and unpacking math and
// the ordered group epilogue, shared by the kernel and its CPU emulation (q4_gemm_mma_emulate.cpp).
//
// Contract: csrc/q4/q4_gemm.h, bit for bit. The activations are quantized per row by the int8 linear's quantizer
// (q8_cuda_tiling.h); the weights are the CPU's w4 pack unchanged ([Np/16][Kp/8][16][4] bytes, the low nibbles of a
// block k = 8kb .. 8kb + 3, the high ones 8kb + 4 .. + 7, each nibble w + 8). The weights are mma's A operand (16
// channels x 32 k, row), the activation rows its B (32 k x 8 rows, col): a 32-bit word of the pack holds 4
// consecutive k of one channel in its low or high nibbles, which is one A-fragment register once its nibbles are
// unpacked to signed bytes (q4_unpack). Each 32-k step lies in one group (groups of a multiple of 32 k, or one
// group per channel), so the int32 sums of a group are exact and complete before the epilogue folds them into the
// float sum in group order, as the CPU does.
#pragma once

#include <cstdint>

#include "cuda/q8_cuda_tiling.h"

namespace pycompress {
namespace q8cuda {

constexpr int kQ4Warps = 8;   // warps of a block: they take 8 groups at a time (or share one group's steps)
constexpr int kQ4Rows = 8;    // activation rows of a block (one mma column tile)
constexpr int kQ4Step = 32;   // k per mma step
constexpr int kQ4KBlock = 8;  // k per packed block (q4_gemm.h kKBlock)

struct Q4Plan {
  int64_t grid_x, grid_y;  // panels, row chunks
  int64_t kp, ldq;         // Kp = round_up(K, 8); quantized row stride (zero past K)
  int64_t steps;           // 32-k steps over Kp (the last may run past Kp: zero nibbles and zero rows there)
  int64_t groups;
  int64_t steps_per_group;  // groups > 1: each group's steps (gk / 32)
};

PYC_HD bool q4_plan(int64_t m, int64_t n, int64_t k, int64_t groups, Q4Plan* out, const char** why) {
  if (k < 1 || k > kMaxK) { *why = "K outside [1, 65536] (an int32 accumulator of u8 x s4 products can overflow)"; return false; }
  if (n < 1) { *why = "N must be at least 1"; return false; }
  if (m < 0) { *why = "M must be >= 0"; return false; }
  Q4Plan p{};
  p.kp = round_up(k, kQ4KBlock);
  if (groups < 1 || p.kp % groups != 0) { *why = "the groups do not split K"; return false; }
  const int64_t gk = p.kp / groups;
  if (groups > 1 && gk % kQ4Step != 0) {
    *why = "groups of a multiple of 32 k (or one group per channel) only on CUDA: each 32-k tensor-core step must lie in one group";
    return false;
  }
  p.groups = groups;
  p.steps_per_group = groups > 1 ? gk / kQ4Step : 0;
  p.steps = (p.kp + kQ4Step - 1) / kQ4Step;
  p.ldq = q_ld(k);  // a multiple of 64: every step's activation bytes lie inside the row
  p.grid_x = (n + kPanel - 1) / kPanel;
  p.grid_y = (m + kQ4Rows - 1) / kQ4Rows;
  if (p.grid_y > kMaxGridY) { *why = "M above 65535 row chunks (524280 rows): split the batch"; return false; }
  if (p.grid_x > 0x7fffffff) { *why = "N above 2^31 - 1 panels"; return false; }
  *out = p;
  return true;
}

// A-fragment register r (0..3) of `lane` at step `s` of panel `panel`: the byte offset in the pack of the word
// holding its 4 k (k = 32 s + a_frag_k(lane, r) .. + 3 of channel a_frag_row(lane, r)), and the nibble (shift 0:
// low, 4: high). `valid` is false past Kp (the register is then 0).
struct Q4Word {
  int64_t offset;
  int shift;
  bool valid;
};
PYC_HD Q4Word q4_a_word(int64_t panel, int64_t kp, int64_t s, int lane, int r) {
  const int64_t k = s * kQ4Step + a_frag_k(lane, r);
  const int64_t kb = k / kQ4KBlock;
  const bool valid = k < kp;
  return Q4Word{valid ? ((panel * (kp / kQ4KBlock) + kb) * kPanel + a_frag_row(lane, r)) * 4 : 0,
                (k % kQ4KBlock) >= 4 ? 4 : 0, valid};
}
// The 4 nibbles (w + 8) of a pack word at `shift` as 4 signed bytes w: t = nibble ^ 8 is w in 4-bit two's
// complement, then bit 3 of each byte is spread over its high nibble (0x08 * 0x1E = 0xF0, no carry between bytes).
PYC_HD uint32_t q4_unpack(uint32_t word, int shift) {
  const uint32_t t = ((word >> shift) & 0x0F0F0F0Fu) ^ 0x08080808u;
  return t | ((t & 0x08080808u) * 0x1Eu);
}
// Where g's scale of channel n lies in g_scale ([Np/16][groups][16]).
PYC_HD int64_t q4_scale_index(int64_t n, int64_t groups, int64_t g) {
  return ((n / kPanel) * groups + g) * kPanel + n % kPanel;
}

// The epilogue after the group sum (q4_gemm.h): v = facc - float(zp) * corr; v = v * row_scale; (+ bias) then
// the activation by the caller; one IEEE float32 rounding each.
PYC_HD float q4_fold(float facc, int32_t acc, float scale) { return PYC_FADD(facc, PYC_FMUL(PYC_I2F(acc), scale)); }
PYC_HD float q4_dequantize(float facc, int32_t zp, float corr, float row_scale) {
  return PYC_FMUL(PYC_FSUB(facc, PYC_FMUL(PYC_I2F(zp), corr)), row_scale);
}

}  // namespace q8cuda
}  // namespace pycompress
