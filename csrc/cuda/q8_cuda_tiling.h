// int8 GEMM on NVIDIA tensor cores: the tiling, fragment and staging index math.
//
// Everything a launch computes that does not need a GPU lives here, as plain
// __host__ __device__ functions: the CUDA kernel (q8_gemm_mma__sm80.cu) calls
// them, and the CPU module runs the same kernel structure over them
// (q8_cuda_emulate.cpp, `_C.cuda_q8_emulate`), so the tests check the tiling,
// the shared-memory layout, the tails and the epilogue against the reference
// on any machine. What only a GPU can confirm is the PTX fragment layout of
// mma.m16n8k32 itself (the a_/b_/c_frag_* functions, transcribed from the PTX
// ISA's "Matrix Fragments for mma.m16n8k32" figures) and the kernel's timing.
//
// Contract: the CPU's (csrc/q8/q8_gemm.h), bit for bit. Activations are
// quantized per row to u8/u7 with a zero point by q8_quantize_rows (one pass per
// row, the CPU's formula in IEEE round-to-nearest intrinsics), weights are the
// CPU's packed layout unchanged, [Np/16][Kp/4][16][4] int8: a 32-bit word of it
// (4 consecutive k of one output channel) is exactly one B-fragment register of
// mma.m16n8k32.row.col.s32.u8.s8.s32, so a state_dict moves between CPU and GPU
// without re-packing. Accumulation is exact int32 (K <= 65536, as on the CPU);
// the epilogue is the CPU's float32 operations in the CPU's order.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PYC_HD __host__ __device__ __forceinline__
#else
#define PYC_HD inline
#endif

namespace pycompress {
namespace q8cuda {

constexpr int kPanel = 16;   // output channels per packed panel (q8_gemm.h)
constexpr int kKGroup = 4;   // k per 32-bit word of the packed layout
constexpr int kMaxK = 65536; // exact int32 accumulation limit (q8_gemm.h)
constexpr int kBK = 64;      // k per main-loop step: two m16n8k32 steps
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 32;
constexpr int kChunk = 16;   // bytes per cp.async

// Shared memory rows are padded so that the 32 lanes of a fragment load hit 32
// different banks: A rows of 64 bytes at a stride of 80 (20 words: row g, word
// t lands in bank (20 g + t) mod 32, all distinct for g < 8, t < 4); B k groups
// of 64 bytes (16 channels x 4 k) at a stride of 96 (24 words: (24 t + g) mod 32,
// all distinct for t < 4, g < 8).
constexpr int kARowBytes = kBK + 16;
constexpr int kBGroupBytes = kPanel * kKGroup + 32;
constexpr int kBPanelBytes = (kBK / kKGroup) * kBGroupBytes;

// Quantized activation rows: row stride q_ld(K) bytes, zero past K, so a k step
// of kBK never reads past a row.
PYC_HD int64_t q_ld(int64_t k) { return (k + kBK - 1) / kBK * kBK; }
PYC_HD int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---- PTX fragment layouts of mma.m16n8k32 with 8-bit A and B ----------------
// lane = threadIdx % 32, g = lane / 4 (groupID), t = lane % 4 (threadID_in_group).
// A (16 x 32, row): register r in 0..3 holds 4 consecutive k of one row.
PYC_HD int a_frag_row(int lane, int r) { return (lane >> 2) + ((r & 1) ? 8 : 0); }
PYC_HD int a_frag_k(int lane, int r) { return (lane & 3) * 4 + ((r & 2) ? 16 : 0); }
// B (32 x 8, col): register r in 0..1 holds 4 consecutive k of one column.
PYC_HD int b_frag_n(int lane) { return lane >> 2; }
PYC_HD int b_frag_k(int lane, int r) { return (lane & 3) * 4 + (r ? 16 : 0); }
// C / D (16 x 8 int32): element e in 0..3.
PYC_HD int c_frag_row(int lane, int e) { return (lane >> 2) + ((e & 2) ? 8 : 0); }
PYC_HD int c_frag_col(int lane, int e) { return (lane & 3) * 2 + (e & 1); }

// ---- shared-memory layout of one stage ----------------------------------------
// Byte offset of (row, k) in the A tile, k < kBK.
PYC_HD int a_smem(int row, int k) { return row * kARowBytes + k; }
// Byte offset of (channel n, k) in the B tile (n < BN, k < kBK): panels of 16
// channels, each kBK / 4 k groups of 16 channels x 4 k.
PYC_HD int b_smem(int n, int k) {
  return (n / kPanel) * kBPanelBytes + (k / kKGroup) * kBGroupBytes + (n % kPanel) * kKGroup + k % kKGroup;
}

// ---- one block tile -----------------------------------------------------------
// BM x BN outputs per block, WM x WN per warp; warps tile the block row-major;
// STAGES shared-memory stages in a cp.async ring (STAGES - 1 k steps in flight
// while one is multiplied).
template <int BM, int BN, int WM, int WN, int STAGES>
struct Tile {
  static_assert(BM % WM == 0 && BN % WN == 0 && WM % kMmaM == 0 && WN % kMmaN == 0 && BN % kPanel == 0, "tile");
  static_assert(STAGES >= 2, "at least double buffering");
  static constexpr int kBM = BM, kBN = BN, kWM = WM, kWN = WN, kStages = STAGES;
  static constexpr int kWarpsM = BM / WM, kWarpsN = BN / WN;
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kMTiles = WM / kMmaM, kNTiles = WN / kMmaN;  // mma tiles per warp
  static constexpr int kAStageBytes = BM * kARowBytes;
  static constexpr int kBStageBytes = (BN / kPanel) * kBPanelBytes;
  static constexpr int kSmemBytes = STAGES * (kAStageBytes + kBStageBytes);
  static constexpr int kAChunks = BM * (kBK / kChunk);               // 16-byte copies of one A stage
  static constexpr int kBChunks = (BN / kPanel) * (kBK / kKGroup) * (kPanel * kKGroup / kChunk);
};

// The two mma.sync tiles a launch chooses between (plan()): rows of a decode step, and
// everything else (on Hopper, the wgmma tile below takes everything else). A decode step is bound by streaming the weights: its tile
// keeps 3 k steps (12 KiB of weights) in flight and splits K (plan()).
using SmallTile = Tile<16, 64, 16, 16, 4>;
using LargeTile = Tile<128, 128, 64, 32, 2>;

// The Hopper tile (sm_90a, q8_gemm_wgmma__sm90a.cu): two warpgroups, each one wgmma.mma_async m64n256k32
// u8 x s8 -> s32 a 32-k step over 64 rows x 256 channels, both operands read by the tensor cores from shared
// memory through matrix descriptors. Shared memory holds each operand in the PTX ISA's canonical K-major layout
// without swizzling: "core matrices" of 8 rows x 16 bytes (16 k), 128 contiguous bytes each, the 4 of a row
// group's 64 k at kWgLbo apart and the row groups at kWgSbo apart (canonical layout ((8, m), (T, 2k)) :
// ((1T, SBO), (1, LBO)), T = 16 one-byte elements).
struct WgTile {
  static constexpr int kBM = 128, kBN = 256, kStages = 4;
  static constexpr int kWarpgroups = 2, kThreads = kWarpgroups * 128;
  static constexpr int kWgM = 64, kWgN = 256, kWgK = 32;  // one wgmma.mma_async
  static constexpr int kAcc = kWgN / 2;                   // int32 accumulators a thread (m64n256 over 128 threads)
  static constexpr int kAStageBytes = kBM * kBK, kBStageBytes = kBN * kBK;
  static constexpr int kSmemBytes = kStages * (kAStageBytes + kBStageBytes);
  static constexpr int kAChunks = kBM * kBK / kChunk;   // 16-byte copies of one A stage (a core matrix row each)
  static constexpr int kBWords = kBN * kBK / kKGroup;   // 4-byte copies of one B stage (4 k of one channel each)
};
// The epilogue stages each warpgroup's accumulators, 64 columns at a time, in the free stages: row stride in
// int32 (72: the 8 rows a warp's store instruction writes fall on 2 distinct bank offsets at most, not 1).
constexpr int kWgEpilogueLd = 72;
static_assert(WgTile::kWarpgroups * WgTile::kWgM * kWgEpilogueLd * 4 <= WgTile::kSmemBytes, "epilogue staging");
constexpr int kWgLbo = 128;                 // bytes from one 16-k core matrix to the next along k
constexpr int kWgSbo = (kBK / 16) * kWgLbo; // bytes from one 8-row group to the next

// Byte offset of (row, k) in a Hopper stage (either operand; k < kBK).
PYC_HD int wg_smem(int row, int k) { return (row % 8) * 16 + (row / 8) * kWgSbo + (k % 16) + (k / 16) * kWgLbo; }

// The 64-bit shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format") of an operand starting at
// shared address `addr`: no swizzle, base offset 0, the LBO and SBO above (all in 16-byte units).
PYC_HD uint64_t wg_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(kWgLbo >> 4) << 16) |
         (static_cast<uint64_t>(kWgSbo >> 4) << 32);
}
// Where the tensor cores read element (r, k) of the operand a descriptor names (r < 64 or 256 rows, k < 32): the
// canonical K-major no-swizzle layout from the descriptor's own fields (the CPU emulation decodes the kernel's
// descriptors with it).
PYC_HD int64_t wg_desc_address(uint64_t desc, int r, int k) {
  const int64_t start = static_cast<int64_t>(desc & 0x3FFF) << 4;
  const int64_t lbo = static_cast<int64_t>((desc >> 16) & 0x3FFF) << 4;
  const int64_t sbo = static_cast<int64_t>((desc >> 32) & 0x3FFF) << 4;
  return start + (r % 8) * 16 + (r / 8) * sbo + (k % 16) + (k / 16) * lbo;
}
// Accumulator i (0 <= i < kAcc) of thread `tid` (0..127) of a warpgroup: its row (0..63) and column (0..255).
PYC_HD int wg_d_row(int tid, int i) { return 16 * ((tid >> 5) & 3) + ((tid & 31) >> 2) + 8 * ((i >> 1) & 1); }
PYC_HD int wg_d_col(int tid, int i) { return 8 * (i >> 2) + 2 * (tid & 3) + (i & 1); }

// A stage's copy number c (0 <= c < kAChunks): 16 bytes of activation row
// m0 + row at k0 + col; rows past m are zero-filled (valid = false).
struct Copy {
  int64_t src;  // byte offset in the source tensor (0 when !valid: nothing is read)
  int dst;      // byte offset in the stage
  bool valid;
};
PYC_HD Copy a_copy(int c, int64_t m0, int64_t k0, int64_t m, int64_t ldq) {
  const int row = c / (kBK / kChunk), col = (c % (kBK / kChunk)) * kChunk;
  const bool valid = m0 + row < m;
  return Copy{valid ? (m0 + row) * ldq + k0 + col : 0, a_smem(row, col), valid};
}
// B copy number c: 16 bytes (4 channels x 4 k) of panel p0 + panel, k group
// k0 / 4 + group; panels past the packed N and groups past the packed K are
// zero-filled.
PYC_HD Copy b_copy(int c, int64_t p0, int64_t k0, int64_t panels, int64_t kp) {
  constexpr int kPerGroup = kPanel * kKGroup / kChunk;  // 4 copies per k group
  constexpr int kPerPanel = (kBK / kKGroup) * kPerGroup;
  const int panel = c / kPerPanel, group = (c / kPerGroup) % (kBK / kKGroup), part = c % kPerGroup;
  const int64_t kg = k0 / kKGroup + group;
  const bool valid = p0 + panel < panels && kg < kp / kKGroup;
  const int64_t src = ((p0 + panel) * kp / kKGroup + kg) * (kPanel * kKGroup) + part * kChunk;
  return Copy{valid ? src : 0, panel * kBPanelBytes + group * kBGroupBytes + part * kChunk, valid};
}

// Hopper stage copies: A chunk c is 16 k of row c / 4 (one core-matrix row); B word c is 4 k of one channel,
// numbered so that consecutive copies read consecutive bytes of the packed panels (channel fastest, then k
// group, then panel). Rows, panels and k past the operands are zero-filled.
PYC_HD Copy wg_a_copy(int c, int64_t m0, int64_t k0, int64_t m, int64_t ldq) {
  const int row = c / (kBK / kChunk), col = (c % (kBK / kChunk)) * kChunk;
  const bool valid = m0 + row < m;
  return Copy{valid ? (m0 + row) * ldq + k0 + col : 0, wg_smem(row, col), valid};
}
PYC_HD Copy wg_b_copy(int c, int64_t p0, int64_t k0, int64_t panels, int64_t kp) {
  constexpr int kGroups = kBK / kKGroup;  // 16 k groups a stage
  const int channel = c % kPanel, group = (c / kPanel) % kGroups, panel = c / (kPanel * kGroups);
  const int64_t kg = k0 / kKGroup + group;
  const bool valid = p0 + panel < panels && kg < kp / kKGroup;
  const int64_t src = ((p0 + panel) * (kp / kKGroup) + kg) * (kPanel * kKGroup) + channel * kKGroup;
  return Copy{valid ? src : 0, wg_smem(panel * kPanel + channel, group * kKGroup), valid};
}

// The activation quantizer: one warp per row, this many rows per block.
constexpr int kQuantRowsPerBlock = 8;

// ---- the launch plan ----------------------------------------------------------
enum class TileKind : int { Small = 0, Large = 1, Wgmma = 2 };

struct Plan {
  TileKind tile;
  int64_t grid_x, grid_y;  // blocks along N, blocks along M
  int64_t splits;          // blocks along K (grid z): each sums steps_per_split k steps
  int64_t steps, steps_per_split;  // k steps of kBK in all, and per split
  int threads, smem_bytes;
  int64_t ldq;             // quantized row stride
  int64_t kp, panels;      // packed K (multiple of 4), packed panels (Np / 16)
};

constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kSmallRows = 16;  // up to this many rows run the small tile
// Split-K of the small tile: enough blocks for kSplitBlocksPerSm on each SM.
// A decode GEMM has N / 64 column tiles (64 for N = 4096), fewer than the 4-5
// blocks an SM holds times its 108-132 SMs: alone they leave most of HBM's
// bandwidth unused. Each split sums its k steps in int32; the last block of a
// column tile to finish adds the splits' partial sums (exact: integers) and
// runs the epilogue, so the output is the same bits at any split count.
constexpr int64_t kSplitBlocksPerSm = 4;
constexpr int64_t kMaxSplits = 32;

// The launch of an (m x k) @ (n x k)^T GEMM on a device of `sms` multiprocessors (0: unknown, no split-K);
// `wgmma`: the device runs the Hopper tile (compute capability 9.0, and the module holds sm_90a code), which
// then takes every call of more than kSmallRows rows. ok = false with `why` set when it cannot run (checked
// before anything is launched).
PYC_HD bool plan(int64_t m, int64_t n, int64_t k, int64_t sms, bool wgmma, Plan* out, const char** why) {
  if (k < 1 || k > kMaxK) { *why = "K outside [1, 65536] (an int32 accumulator of u8 x s8 products can overflow)"; return false; }
  if (n < 1) { *why = "N must be at least 1"; return false; }
  if (m < 0) { *why = "M must be >= 0"; return false; }
  if (sms < 0) { *why = "the multiprocessor count must be >= 0"; return false; }
  Plan p{};
  const bool small = m <= kSmallRows;
  p.tile = small ? TileKind::Small : (wgmma ? TileKind::Wgmma : TileKind::Large);
  int bm = LargeTile::kBM, bn = LargeTile::kBN;
  p.threads = LargeTile::kThreads;
  p.smem_bytes = LargeTile::kSmemBytes;
  if (p.tile == TileKind::Small) {
    bm = SmallTile::kBM, bn = SmallTile::kBN, p.threads = SmallTile::kThreads, p.smem_bytes = SmallTile::kSmemBytes;
  } else if (p.tile == TileKind::Wgmma) {
    bm = WgTile::kBM, bn = WgTile::kBN, p.threads = WgTile::kThreads, p.smem_bytes = WgTile::kSmemBytes;
  }
  p.grid_x = (n + bn - 1) / bn;
  p.grid_y = (m + bm - 1) / bm;
  if (p.grid_y > kMaxGridY) { *why = "M above 65535 row tiles (8388480 rows): split the batch"; return false; }
  p.ldq = q_ld(k);
  p.kp = round_up(k, kKGroup);
  p.panels = round_up(n, kPanel) / kPanel;
  p.steps = p.ldq / kBK;
  p.splits = 1;
  // Split-K where the tiles alone leave multiprocessors idle: the decode tile until each SM holds
  // kSplitBlocksPerSm blocks, the Hopper tile (one block an SM) until each SM holds one. (m = 0 launches nothing.)
  const int64_t per_sm = p.tile == TileKind::Small ? kSplitBlocksPerSm : (p.tile == TileKind::Wgmma ? 1 : 0);
  if (per_sm > 0 && sms > 0 && m > 0) {
    const int64_t tiles = p.grid_x * p.grid_y;
    int64_t want = (per_sm * sms + tiles - 1) / tiles;
    want = want < p.steps ? want : p.steps;
    p.splits = want < kMaxSplits ? (want > 1 ? want : 1) : kMaxSplits;
  }
  p.steps_per_split = (p.steps + p.splits - 1) / p.splits;
  p.splits = (p.steps + p.steps_per_split - 1) / p.steps_per_split;  // no split without steps
  *out = p;
  return true;
}

// The sparse kernels (bsr1x4 int8, csr float): one warp per output channel, kSparseWarps channels a block, kSparseRows
// activation rows a pass (grid y).
constexpr int kSparseWarps = 8;
constexpr int kSparseRows = 8;

struct SparsePlan {
  int64_t grid_x, grid_y;
};

PYC_HD bool sparse_plan(int64_t m, int64_t n, int64_t k, SparsePlan* out, const char** why) {
  if (k < 1 || k > kMaxK) { *why = "K outside [1, 65536] (uint16 column indices; int32 sums of u8 x s8 products)"; return false; }
  if (n < 1) { *why = "N must be at least 1"; return false; }
  if (m < 0) { *why = "M must be >= 0"; return false; }
  out->grid_x = (n + kSparseWarps - 1) / kSparseWarps;
  out->grid_y = (m + kSparseRows - 1) / kSparseRows;
  if (out->grid_y > kMaxGridY) { *why = "M above 65535 row groups (524280 rows): split the batch"; return false; }
  return true;
}

// The rows a sparse pass handles from row m0 (kSparseRows or the remainder).
PYC_HD int sparse_rows_in_pass(int64_t m, int64_t m0) { return static_cast<int>(m - m0 < kSparseRows ? m - m0 : kSparseRows); }
// Column of stored value j of a channel of the nm24 pack from its index words (csrc/sparse/sparse.h, nm24_k: the
// format's definition): below K for every index when K % 4 == 0, so no pack can read past a row.
PYC_HD int32_t nm24_col(const uint32_t* idx_row, int32_t j) {
  return 4 * (j >> 1) + static_cast<int32_t>((idx_row[j >> 4] >> (2 * (j & 15))) & 3u);
}

// Device scratch of one call (byte offsets, each 16-byte aligned): the quantized
// rows (m x ldq), then per row the scale (float), zero point (int32) and
// non-finite flag (uint8); with split-K (splits > 1) the splits' int32 partial
// sums ([splits][m][n]) and one arrival counter per output tile (int32, zeroed
// by the quantization kernel that runs first on the stream).
struct Scratch {
  int64_t q, scale, zp, nonfinite, partial, counters, total;
};
PYC_HD Scratch scratch_layout(int64_t m, int64_t n, int64_t k, int64_t splits, int64_t tiles) {
  Scratch s{};
  s.q = 0;
  s.scale = round_up(m * q_ld(k), 16);
  s.zp = s.scale + round_up(m * 4, 16);
  s.nonfinite = s.zp + round_up(m * 4, 16);
  s.partial = s.nonfinite + round_up(m, 16);
  s.counters = s.partial + (splits > 1 ? round_up(splits * m * n * 4, 16) : 0);
  s.total = s.counters + (splits > 1 ? round_up(tiles * 4, 16) : 0);
  return s;
}
// The quantizer's part alone (no split-K): what the sparse kernels and the epilogue's per-row operands use; its
// offsets are the same in every layout above.
PYC_HD Scratch scratch_layout(int64_t m, int64_t k) { return scratch_layout(m, 0, k, 1, 0); }
PYC_HD Scratch scratch_layout(int64_t m, int64_t n, const Plan& p) {
  return scratch_layout(m, n, p.ldq, p.splits, p.grid_x * p.grid_y);
}

// ---- the epilogue: the CPU's operations, one IEEE float32 rounding each -------
#if defined(__CUDA_ARCH__)
#define PYC_FMUL(a, b) __fmul_rn((a), (b))
#define PYC_FADD(a, b) __fadd_rn((a), (b))
#define PYC_I2F(a) __int2float_rn(a)
#define PYC_FSUB(a, b) __fsub_rn((a), (b))
#define PYC_FDIV(a, b) __fdiv_rn((a), (b))
#define PYC_F2I(a) __float2int_rn(a)
#else
#define PYC_FMUL(a, b) ((a) * (b))
#define PYC_FADD(a, b) ((a) + (b))
#define PYC_I2F(a) static_cast<float>(a)
#define PYC_FSUB(a, b) ((a) - (b))
#define PYC_FDIV(a, b) ((a) / (b))
#define PYC_F2I(a) static_cast<int32_t>(std::nearbyint(a))
#endif

// ---- activation quantization (q8_gemm.h's row_params and quantize_value) -------
struct RowQuant {
  float scale, inv_scale;
  int32_t zp;
  bool finite;
};

// The row's scale and zero point from its range [lo, hi] (both include 0) or
// the static ones; a row with a non-finite value, or whose range overflows,
// gets scale 1, zp 0 and finite = false (its outputs are NaN).
PYC_HD RowQuant row_quant(float lo, float hi, bool all_finite, bool is_static, float static_scale, int32_t static_zp,
                          int32_t qmax) {
  float scale = static_scale;
  if (!is_static) {
    scale = PYC_FDIV(PYC_FSUB(hi, lo), static_cast<float>(qmax));
    scale = scale < FLT_MIN ? FLT_MIN : scale;
  }
  if (!all_finite || !(scale <= FLT_MAX)) return RowQuant{1.0f, 1.0f, 0, false};
  const float inv_scale = PYC_FDIV(1.0f, scale);
  int32_t zp = static_zp;
  if (!is_static) {
    zp = PYC_F2I(PYC_FMUL(-lo, inv_scale));
    zp = zp < 0 ? 0 : (zp > qmax ? qmax : zp);
  }
  return RowQuant{scale, inv_scale, zp, true};
}

PYC_HD uint8_t quantize_value(float x, float inv_scale, int32_t zp, int32_t qmax) {
  float v = PYC_FMUL(x, inv_scale);
  v = v < -256.0f ? -256.0f : (v > 256.0f ? 256.0f : v);
  const int32_t q = PYC_F2I(v) + zp;
  return static_cast<uint8_t>(q < 0 ? 0 : (q > qmax ? qmax : q));
}

// v = float(acc - zp * colsum) * (row_scale * w_scale) (+ bias); the activation
// is applied by the caller (gelu needs its table on the device).
PYC_HD float dequantize(int32_t acc, int32_t zp, int32_t col_sum, float row_scale, float w_scale) {
  // Wrapping arithmetic, as the CPU: the exact result fits int32 even when zp * colsum alone is near the limit.
  const int32_t corrected = static_cast<int32_t>(static_cast<uint32_t>(acc) -
                                                 static_cast<uint32_t>(zp) * static_cast<uint32_t>(col_sum));
  return PYC_FMUL(PYC_I2F(corrected), PYC_FMUL(row_scale, w_scale));
}

}  // namespace q8cuda
}  // namespace pycompress
