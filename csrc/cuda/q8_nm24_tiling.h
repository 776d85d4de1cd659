// int8 linear over 2:4 sparse weights on sparse tensor cores (mma.sp m16n8k64, s8 weights x u8 activations):
// the GPU pack, the fragment and launch math, shared by the kernel (q8_nm24_mma__sm80.cu) and its CPU
// emulation (q8_nm24_mma_emulate.cpp).
//
// Contract: the dense int8 linear's (q8_cuda_tiling.h, csrc/q8/q8_gemm.h), bit for bit. The weights are a
// dense int8 layer's (the CPU's packed layout) whose every 4 consecutive k (k = 4g .. 4g + 3, one 32-bit word
// of the pack) of a channel hold at most 2 non-zeros; the sums are exact int32, so skipping the zeros changes
// no bit. The weights are the sparse operand, so they are mma's A (16 output channels x 64 k) and the
// activation rows its B (64 k x 8 rows): D[channel][row].
//
// The GPU pack: per panel of 16 channels and per step of 64 k, each lane's four A registers (16 bytes: the
// non-zeros it holds) and its metadata register, in lane order, so a warp loads a step's weights with one
// coalesced 16-byte load a lane and its metadata with one 4-byte load:
//   values [panels][steps][32 lanes][16 bytes], then meta [panels][steps][32 lanes] uint32.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for sparse mma.m16n8k64 with .u8/.s8"; lane = 32 threads,
// g = lane / 4, t = lane % 4). A, compressed to 16 x 32: byte p (0..15) of lane's four registers is row
// g + 8 * ((p / 4) % 2), compressed column 4 t + p % 4 + 16 * (p / 8); compressed columns 2c, 2c + 1 are the
// two kept values of the 4-k chunk c (k = 4c .. 4c + 3 of the step). Metadata: nibble j (bits 4j .. 4j + 3)
// of a lane's register holds the chunk of its bytes p = 2j, 2j + 1: bits 0-1 the index (0..3) in the chunk of
// the first kept value, bits 2-3 of the second, ascending (the ordered_metadata form). B (64 x 8): register r
// holds k = 16 r + 4 t .. + 3 of column (activation row) g. C / D: as the dense mma (c_frag_row / c_frag_col,
// row = output channel, column = activation row). The A / metadata layouts are figures in the PTX ISA, not
// text: a GPU run (bench/gpu_check.sh, tests marked cuda) is what confirms them.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "cuda/q8_cuda_tiling.h"

namespace pycompress {
namespace q8cuda {

constexpr int kSpK = 64;      // k per mma.sp step
constexpr int kSpWarps = 8;   // warps of a block: they share one panel's k steps, then add their sums
constexpr int kSpLaneBytes = 16;  // A bytes a lane holds per step
// The int8 linear takes this kernel for 2:4 weights up to this many rows (a decode step, where the weight bytes
// bound the time; the kernel re-reads the weights for every 32 rows, the dense tiles do not):
// pycompress/ops/q8.py reads it as _C.CUDA_NM24_MAX_ROWS.
constexpr int64_t kNm24MaxRows = kSmallRows;
static_assert(kSpK == kBK, "the quantizer pads each row to a multiple of kBK (q_ld)");

// ---- fragments ------------------------------------------------------------------
// Compressed A byte p (0..15) of `lane`: its row (output channel in the panel) and compressed column (0..31).
PYC_HD int sp_a_row(int lane, int p) { return (lane >> 2) + 8 * ((p >> 2) & 1); }
PYC_HD int sp_a_ccol(int lane, int p) { return 4 * (lane & 3) + (p & 3) + 16 * (p >> 3); }
// Metadata nibble j (0..7) of `lane`: the row and the 4-k chunk (0..15 of the step) it describes.
PYC_HD int sp_meta_row(int lane, int j) { return (lane >> 2) + 8 * ((j >> 1) & 1); }
PYC_HD int sp_meta_chunk(int lane, int j) { return 2 * (lane & 3) + (j & 1) + 8 * (j >> 2); }
// B register r (0..3) of `lane`: its first k (4 consecutive) and column.
PYC_HD int sp_b_k(int lane, int r) { return 16 * r + 4 * (lane & 3); }
PYC_HD int sp_b_n(int lane) { return lane >> 2; }

// ---- the pack --------------------------------------------------------------------
struct Nm24Layout {
  int64_t panels, steps;
  int64_t values_bytes, meta_bytes, total;  // meta starts at values_bytes (a multiple of 512)
};
PYC_HD Nm24Layout nm24_layout(int64_t n, int64_t k) {
  Nm24Layout l{};
  l.panels = (n + kPanel - 1) / kPanel;
  l.steps = (k + kSpK - 1) / kSpK;
  l.values_bytes = l.panels * l.steps * 32 * kSpLaneBytes;
  l.meta_bytes = l.panels * l.steps * 32 * 4;
  l.total = l.values_bytes + l.meta_bytes;
  return l;
}

// The GPU pack of the CPU-packed int8 weights `w` ([Np/16][Kp/4][16][4], N = n, Kp = k rounded up to 4) into
// `out` (nm24_layout(n, k).total bytes). "" on success; else the first channel and k chunk with more than 2
// non-zeros (nothing is usable then).
inline std::string nm24_pack(const int8_t* w, int64_t n, int64_t k, uint8_t* out) {
  const Nm24Layout l = nm24_layout(n, k);
  const int64_t kp = round_up(k, kKGroup), groups = kp / kKGroup;
  uint8_t* values = out;
  uint8_t* meta = out + l.values_bytes;
  std::memset(out, 0, static_cast<size_t>(l.total));
  for (int64_t panel = 0; panel < l.panels; ++panel)
    for (int64_t step = 0; step < l.steps; ++step) {
      // The step's 16 x 16 chunks: two kept values each, and their indices (ascending).
      int8_t kept[16][16][2];
      uint8_t index[16][16][2];
      for (int row = 0; row < kPanel; ++row)
        for (int c = 0; c < kSpK / kKGroup; ++c) {
          const int64_t g = step * (kSpK / kKGroup) + c;
          int8_t v[4] = {0, 0, 0, 0};
          if (g < groups) std::memcpy(v, w + ((panel * groups + g) * kPanel + row) * kKGroup, 4);
          int nz[4], count = 0;
          for (int i = 0; i < 4; ++i)
            if (v[i] != 0) {
              if (count == 2) {
                const int64_t channel = panel * kPanel + row;
                return "output channel " + std::to_string(channel) + " has more than 2 non-zeros in k " +
                       std::to_string(4 * g) + ".." + std::to_string(4 * g + 3) + " (not 2:4 sparse)";
              }
              nz[count++] = i;
            }
          // Fewer than 2 non-zeros: fill with zero-valued positions, keeping the indices ascending and distinct.
          int a = count > 0 ? nz[0] : 0, b = count > 1 ? nz[1] : -1;
          if (count == 1) {
            if (a == 3) { b = 3; a = 2; } else { b = 3; }
          } else if (count == 0) {
            a = 0;
            b = 1;
          }
          index[row][c][0] = static_cast<uint8_t>(a);
          index[row][c][1] = static_cast<uint8_t>(b);
          kept[row][c][0] = v[a];
          kept[row][c][1] = v[b];
        }
      const int64_t base = panel * l.steps + step;
      for (int lane = 0; lane < 32; ++lane) {
        uint8_t* lv = values + (base * 32 + lane) * kSpLaneBytes;
        for (int p = 0; p < kSpLaneBytes; ++p) {
          const int ccol = sp_a_ccol(lane, p);
          lv[p] = static_cast<uint8_t>(kept[sp_a_row(lane, p)][ccol >> 1][ccol & 1]);
        }
        uint32_t e = 0;
        for (int j = 0; j < 8; ++j) {
          const uint8_t* ix = index[sp_meta_row(lane, j)][sp_meta_chunk(lane, j)];
          e |= static_cast<uint32_t>(ix[0] | (ix[1] << 2)) << (4 * j);
        }
        std::memcpy(meta + (base * 32 + lane) * 4, &e, 4);
      }
    }
  return "";
}

// ---- the launch -------------------------------------------------------------------
// One block: kSpWarps warps over one panel of 16 channels and `rows` activation rows (8 per mma, `tiles` of
// them: 1 for up to 8 rows, 2 for 16, else 4); the warps take the panel's k steps in turn and add their int32
// sums in shared memory before the epilogue.
struct Nm24Plan {
  int64_t grid_x, grid_y;  // panels, row chunks
  int64_t steps, ldq;
  int tiles;               // mma column tiles (8 rows each) per block
};
PYC_HD bool nm24_plan(int64_t m, int64_t n, int64_t k, Nm24Plan* out, const char** why) {
  if (k < 1 || k > kMaxK) { *why = "K outside [1, 65536] (an int32 accumulator of u8 x s8 products can overflow)"; return false; }
  if (n < 1) { *why = "N must be at least 1"; return false; }
  if (m < 0) { *why = "M must be >= 0"; return false; }
  Nm24Plan p{};
  p.tiles = m <= 8 ? 1 : (m <= 16 ? 2 : 4);
  p.grid_x = (n + kPanel - 1) / kPanel;
  p.grid_y = (m + 8 * p.tiles - 1) / (8 * p.tiles);
  if (p.grid_y > kMaxGridY) { *why = "M above 65535 row chunks (2097120 rows): split the batch"; return false; }
  if (p.grid_x > 0x7fffffff) { *why = "N above 2^31 - 1 panels"; return false; }
  p.ldq = q_ld(k);  // a multiple of kSpK: the quantizer zero-fills each row to it
  p.steps = p.ldq / kSpK;
  *out = p;
  return true;
}

}  // namespace q8cuda
}  // namespace pycompress
