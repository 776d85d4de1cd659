// 4-bit-weight GEMM, W4A8: y = act(dequant(quant_u8(x) @ W_4^T) + b).
//
// Numbers (the contract every ISA path implements bit for bit; the reference
// is pycompress/reference/q4.py):
//   activations  the int8 linear's (q8_gemm.h): unsigned per row (dynamic) or
//                per tensor (static), u8 or u7, with a zero point zp[r] and a
//                scale rs[r].
//   weights      integers w in [-8, 7] (2..4-bit formats alike), stored as the
//                unsigned nibble w + 8, one float scale s[n][g] per output channel
//                and group g of gk consecutive k: gk = Kp / groups, where
//                Kp = round_up(K, 8); groups = 1 is per channel.
//   accumulate   acc[r][n][g] = sum over the group of q[r][k] * w[n][k], exact
//                in int32 (|q * w| <= 255 * 8, K <= 65536). The vector paths sum
//                q * (w + 8), the stored nibble as is, and subtract 8 * the group's
//                sum of q[r][k] (from the driver's per-row block prefix sums).
//   epilogue     facc = 0; for g in order: facc = facc + float(acc[g]) * s[n][g];
//                v = facc - float(zp[r]) * corr[n]; v = v * rs[r];
//                v = v + bias[n]; v = act(v); each step one IEEE float32
//                operation (corr: see below).
//   non-finite   as q8: a row of x holding NaN or Inf gives a row of NaN.
//
// Packed operands (ISA independent, so a state_dict moves between CPUs):
//   w4      uint8 [Np/16][Kp/8][16][4], Np = round_up(N, 16): in block kb of
//           panel p, byte (c, j) holds w[16p + c][8kb + j] + 8 in its low
//           nibble and w[16p + c][8kb + 4 + j] + 8 in its high nibble. The low
//           nibbles of a block, masked out, are one vpdpbusd operand (4 k x 16
//           channels, unsigned x signed 0..15), the high nibbles the next one.
//           Padding weights are 0 (nibble 8).
//   g_scale float [Np/16][groups][16]: a panel's 16 scales, group by group
//           (padding channels 0).
//   corr    float [Np]: for g in order from 0: corr = corr + float(sum of the
//           group's w) * s[n][g], the zero point's share of the epilogue.
#pragma once

#include <cstdint>

#include "common/epilogue_math.h"
#include "common/isa.h"

namespace pycompress {
namespace q4 {

constexpr int64_t kPanel = 16;
constexpr int64_t kKBlock = 8;       // k values per packed block (two vpdpbusd operands)
constexpr int64_t kBlockBytes = 64;  // one block of one panel
constexpr int64_t kTileCols = 64;    // columns per driver tile (4 panels)

// One tile: rows [0, m) of the quantized activations against columns
// [n0, n0 + ncols) (n0 a multiple of kPanel, ncols <= kTileCols).
struct Tile {
  const uint8_t* a;        // quantized activations, row stride lda >= kp (kp columns read)
  int64_t lda;
  int64_t m;
  const uint8_t* w;        // packed weights (whole matrix)
  int64_t kp;              // round_up(K, 8)
  int64_t groups;          // kp % groups == 0; each group kp / groups (a multiple of 8) long
  int64_t n0, ncols;
  const float* row_scale;
  const int32_t* row_zp;
  // Per row, prefix sums of the quantized activations over 8-k blocks:
  // row_ksum[r * ldsum + kb] = sum of q[r][0, 8kb); a group's sum is a difference.
  const int32_t* row_ksum;
  int64_t ldsum;
  const float* g_scale;
  const float* corr;
  const float* bias;       // nullable
  Activation act;
  float* y;                // y + r * ldy + n
  int64_t ldy;
  // The same rows packed into 16-row blocks of 1 KiB tiles for the AMX kernel
  // (q8_gemm.h, pack_rows), from the tile's first row (a multiple of 16), with
  // packed_ld bytes a block; nullptr where the driver did not pack them.
  const uint8_t* packed = nullptr;
  int64_t packed_ld = 0;
};

struct Kernels {
  void (*gemm_tile)(const Tile&);
};

const Kernels& kernels_scalar();
#if PYCOMPRESS_X86
const Kernels& kernels_avx2();
const Kernels& kernels_avxvnni();
const Kernels& kernels_avx512vnni();
const Kernels& kernels_amx();  // tdpbusd on packed rows; the AVX-512 kernel without them
#endif
const Kernels& kernels_for(Isa isa);

constexpr int32_t kNibbleBias = 8;  // stored nibble = weight + 8

namespace {  // internal linkage: included by translation units with different ISA flags

// 8 x the activation sum of row r over blocks [kb0, kb1): what the nibbles' bias added to a group's sum.
inline int32_t bias_sum(const Tile& t, int64_t r, int64_t kb0, int64_t kb1) {
  const int32_t* p = t.row_ksum + r * t.ldsum;
  return kNibbleBias * (p[kb1] - p[kb0]);
}

}  // namespace

// Fills t.row_ksum-style prefix sums for m rows of kp (a multiple of 8) quantized activations.
void block_prefix_sums(const uint8_t* q, int64_t m, int64_t kp, int64_t lda, int32_t* out, int64_t ldsum);

}  // namespace q4
}  // namespace pycompress
