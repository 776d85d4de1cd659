// 4-bit-weight GEMM, W4A8: y = act(dequant(quant_u8(x) @ W_4^T) + b).
//
// Numbers (the contract every ISA path implements bit for bit; the reference
// is pycompress/reference/q4.py):
//   activations  the int8 linear's (q8_gemm.h): unsigned per row (dynamic) or
//                per tensor (static), u8 or u7, with a zero point zp[r] and a
//                scale rs[r].
//   weights      4-bit two's-complement integers in [-8, 7] (2..4-bit formats
//                are stored alike), one float scale s[n][g] per output channel
//                and group g of gk consecutive k: gk = Kp / groups, where
//                Kp = round_up(K, 8); groups = 1 is per channel.
//   accumulate   acc[r][n][g] = sum over the group of q[r][k] * w[n][k], exact
//                in int32 (|q * w| <= 255 * 8, K <= 65536).
//   epilogue     facc = 0; for g in order: facc = facc + float(acc[g]) * s[n][g];
//                v = facc - float(zp[r]) * corr[n]; v = v * rs[r];
//                v = v + bias[n]; v = act(v); each step one IEEE float32
//                operation (corr: see below).
//   non-finite   as q8: a row of x holding NaN or Inf gives a row of NaN.
//
// Packed operands (ISA independent, so a state_dict moves between CPUs):
//   w4      uint8 [Np/16][Kp/8][16][4], Np = round_up(N, 16): in block kb of
//           panel p, byte (c, j) holds w[16p + c][8kb + j] in its low nibble
//           and w[16p + c][8kb + 4 + j] in its high nibble. The low nibbles of
//           a block are one vpdpbusd operand (4 k x 16 channels), the high
//           nibbles the next one. Padding is 0.
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
  const float* g_scale;
  const float* corr;
  const float* bias;       // nullable
  Activation act;
  float* y;                // y + r * ldy + n
  int64_t ldy;
};

struct Kernels {
  void (*gemm_tile)(const Tile&);
};

const Kernels& kernels_scalar();
#if PYCOMPRESS_X86
const Kernels& kernels_avx2();
const Kernels& kernels_avxvnni();
const Kernels& kernels_avx512vnni();
#endif
const Kernels& kernels_for(Isa isa);

namespace {

// The sign-extending map of a nibble (vpshufb table): 0..7 -> 0..7, 8..15 -> -8..-1.
alignas(64) constexpr int8_t kNibbleToInt8[64] = {
    0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1,
    0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};

}  // namespace

}  // namespace q4
}  // namespace pycompress
