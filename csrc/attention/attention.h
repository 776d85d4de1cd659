// Fused attention: out = softmax(scale * Q K^T + mask) V for every (batch, head).
//
// Operands (fp32; every stride in elements; only the last dim must be contiguous):
//   q    [B, H, Sq, D]   element (b, h, i, e) at q[b*q_sb + h*q_sh + i*q_ss + e]
//   k    [B, H, Sk, D]   likewise with k_s*
//   v    [B, H, Sk, Dv]  likewise with v_s*
//   mask none, additive float or bool (nonzero = keep), broadcast as [B|1, H|1, Sq|1, Sk|1]:
//        element (b, h, i, j) at mask[b*m_sb + h*m_sh + i*m_ss + j*m_sk]; a stride of 0
//        broadcasts that dim. Bool masks are one byte per element.
//   causal  query i sees keys j <= i (top-left aligned, as torch's is_causal); may be
//        combined with a mask (both apply).
//   out  [B, Sq, H, Dv] contiguous: the [B, Sq, H*Dv] tensor a transformer's output
//        projection reads next, with no transpose copy.
//
// Numbers (every ISA path; they agree to fp32 rounding, not bit for bit):
//   s_ij  = scale * (q_i . k_j) + mask_ij, where a bool-False or causally hidden key has
//           s_ij = -inf. The scalar path (the specification) accumulates the dot products,
//           the softmax sum and the output in double; the vector paths in float with FMA,
//           in runs of 32 terms (dot products) and 128 keys (outputs) whose sums are
//           then added up, so the rounding error does not grow with D or Sk.
//   p_ij  = exp(s_ij - m_i) with m_i = max_j s_ij; out_i = sum_j p_ij v_j / sum_j p_ij.
//   fully masked rows: a row whose scores are all -inf (every key masked) gives 0, as
//           torch.nn.functional.scaled_dot_product_attention does since torch 2.5.
//           Sk == 0 is the same case: every row is 0.
//   non-finite inputs: a NaN score (NaN in q_i or k_j, or inf - inf) makes row i NaN; a
//           +inf score makes row i NaN (inf - inf in the softmax), as the float64
//           reference does. A NaN/Inf in v_j reaches every row that gives key j a nonzero
//           weight. Whether it also reaches a row that gives key j weight exactly 0 (a
//           masked key; 0 * inf = NaN) is unspecified: the vector paths skip keys beyond
//           the causal boundary of a whole row tile, but not masked keys inside a tile.
//   exp    scalar path: std::exp. Vector paths work in base 2: the dot products are scaled
//          by scale * log2(e) and additive masks by log2(e), and p = 2^(s2 - m2) with their
//          own exp2: n = round(x), f = x - n (exact), 2^f by a degree-6 polynomial
//          (coefficients: bench/exp_coefficients.py, fit error 1.6e-8 relative), times
//          2^n (AVX-512 vscalefps; AVX2 two exponent-field multiplies, so a subnormal
//          result rounds once). Max error 1 ulp against float64 2^x rounded to float
//          (tests/test_attention.py::test_exp2_accuracy: a 1e-4 grid over [-160, 140],
//          both signs of 1e-40..1, 2^20 random bit patterns: every exponent, NaN, inf);
//          2^-inf = 0, 2^inf = inf, 2^NaN = NaN, results below the subnormal range are 0.
//
// Memory: blockwise (flash-style) online softmax. A thread holds a chunk of at most
// kMaxChunkRows query rows (output accumulators, running max and sum) and one
// block of at most kMaxKeyBlock keys (K^T packed, one row tile of scores): scratch is
// O(rows * Dv + D * key block), independent of Sk. The scalar path keeps one score row
// of Sk floats instead (O(Sk)).
#pragma once

#include <cstdint>

#include "common/isa.h"

namespace pycompress {
namespace attention {

enum class MaskKind : int { None = 0, Additive = 1, Bool = 2 };

struct AttentionArgs {
  const float* q;
  int64_t q_sb, q_sh, q_ss;
  const float* k;
  int64_t k_sb, k_sh, k_ss;
  const float* v;
  int64_t v_sb, v_sh, v_ss;
  int64_t batch, heads, sq, sk, d, dv;
  MaskKind mask_kind;
  const void* mask;  // float* (Additive) or uint8_t* (Bool); nullptr for None
  int64_t m_sb, m_sh, m_ss, m_sk;
  bool causal;
  float scale;
  float* out;  // [B, Sq, H, Dv] contiguous
  int nthreads;
};

// Query rows per task at most, and keys per block (the tile's K^T stays in L1/L2).
constexpr int64_t kMaxChunkRows = 256;
constexpr int64_t kMaxKeyBlock = 512;
constexpr int64_t kMinKeyBlock = 64;
constexpr int64_t kKeyBlockFloats = 16384;  // D * key block <= 64 KiB of packed K^T
constexpr int64_t kPad = 16;                // scratch rows padded to the widest vector

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Keys per block for head dim d: a multiple of kPad in [kMinKeyBlock, kMaxKeyBlock].
inline int64_t key_block(int64_t d) {
  int64_t kb = kKeyBlockFloats / (d > 0 ? d : 1) / kPad * kPad;
  return kb < kMinKeyBlock ? kMinKeyBlock : (kb > kMaxKeyBlock ? kMaxKeyBlock : kb);
}

// Per-thread scratch handed to a kernel, sized by the driver for `rows` query rows.
struct Workspace {
  float* kt;     // d x round_up(key_block, kPad): K^T of one key block
  float* s;      // kMaxTileRows x round_up(key_block, kPad) scores / probabilities
                 // (the scalar path: one row of Sk)
  float* o;      // rows x round_up(dv, kPad): unnormalised output accumulators
  float* m;      // rows: running max
  float* l;      // rows: running sum of probabilities
};
constexpr int64_t kMaxTileRows = 8;

struct Kernels {
  // The scalar path's score scratch is one row of Sk floats, the blocked paths' one tile.
  bool score_row_of_sk;
  // Rows [r0, r1) of head (b, h), at most kMaxChunkRows of them, written to out.
  void (*attend_rows)(const AttentionArgs& a, int64_t b, int64_t h, int64_t r0, int64_t r1, const Workspace& ws);
  // y[i] = 2^x[i] with this path's exp2 (test hook for its accuracy).
  void (*exp2_n)(const float* x, float* y, int64_t n);
};

const Kernels& kernels_scalar();
#if PYCOMPRESS_X86
const Kernels& kernels_avx2();
const Kernels& kernels_avx512vnni();
#endif
const Kernels& kernels_for(Isa isa);

// Validates sizes and strides (std::invalid_argument naming what was expected), then
// runs on args.nthreads threads (at most) with the active ISA's kernels.
void attention(const AttentionArgs& args);

// Test hook: 2^x of n floats on the active ISA.
void exp2_active(const float* x, float* y, int64_t n);

}  // namespace attention
}  // namespace pycompress
