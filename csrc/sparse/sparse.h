// Sparse linear layers: y = act(x @ W_sparse^T + b), fp32 and int8 weights.
//
// Formats (each chosen for what this CPU does well; all ISA independent, so a
// state_dict moves between CPUs):
//
//   csr     fp32, unstructured. row_ptr int32 [N+1], col_idx uint16 [nnz],
//           values float [nnz]. uint16 halves the index traffic of int32 and is
//           enough for K <= kMaxK = 65536; larger K is refused with an error
//           (split the layer) rather than silently using a slower path.
//   nm24    fp32, 2:4 semi-structured: every group of 4 consecutive k holds at
//           most 2 nonzeros, stored as exactly 2 values (a zero value when the
//           group holds fewer). values float [N][K/2]; indices 2 bits per stored
//           value: nonzero j of row n lives at k = 4*(j/2) + ((idx[n][j/16] >>
//           2*(j%16)) & 3), idx uint32 [N][ceil(K/32)]. One uint32 word is the
//           16 indices one zmm gather needs. K % 4 == 0 is required, so every
//           decodable index is < K: a corrupt nm24 pack cannot address out of
//           bounds, only the sizes need checking.
//   bsr1x4  int8, 1x4 blocks along K (one output channel x 4 consecutive k):
//           exactly one 32-bit operand of the VNNI 4-byte dot product
//           (vpdpbusd), so a block costs one instruction per 16 rows.
//           row_ptr int32 [N+1] over blocks, blk_idx uint16 [nblocks] (k/4),
//           values int8 [nblocks][4], col_sum int32 [N] (row sums, for the
//           activation zero point). Unstructured int8 sparsity is packed in this
//           format too: at 90% unstructured sparsity 34% of the 1x4 blocks are
//           nonzero, i.e. 0.86 vpdpbusd per true nonzero per 16 rows, which is
//           no worse than a 1x1 format could do with int32 multiplies; block
//           pruning (1x4) makes it 10% of the blocks.
//
//   sliced  int8, derived from a bsr1x4 pack by build_sliced (never stored in
//           a state_dict; the module rebuilds it). Output channels in slices of
//           kSliceLanes = 16 (one zmm lane = one channel: one vpdpbusd serves 16
//           channels). A slice is a list of steps; step j holds one 1x4 block
//           (or a zero pad) per lane, all within a window of 16 k/4 groups that
//           starts at group step_base[j]: the 64 activation bytes of the window
//           are one unaligned zmm load, and vpermd (16 dword lanes, 4-bit index)
//           moves each lane's group into place. No gather: per step one weight
//           load, one vpermd and one vpdpbusd per row. Lane l's 4-bit window
//           offset is nibble l/2 of step_lane[2j + l%2] (even lanes in word 0,
//           odd in word 1: a qword broadcast plus one vpsrlvd puts every
//           nibble in its lane; vpermd ignores the bits above). Packing is
//           greedy: each step's window starts at the smallest pending group of
//           the slice and every lane whose next block falls inside it takes
//           that block, so lanes drift at most 16 groups apart and padding
//           stays low (bench/bench_sparse.py prints the fill).
//           slice_ptr int32 [ceil(N/16)+1] over steps, step_base uint16
//           [nsteps] with step_base + 16 <= max(K/4 rounded up, 16) (so any
//           nibble is in range), step_lane uint32 [nsteps][2], values int8
//           [nsteps][16][4]. Activations are read with a row stride of
//           sliced_row_bytes(k) = max(kp, 64) (zero padded).
//
//   sliced bytes  int8, the same slices and steps at byte granularity, for
//           unstructured sparsity (AVX-512 VBMI: vpermb). A step's window is
//           64 activation bytes from byte step_base[j] (<= sliced_row_bytes(k)
//           - 64) and every lane takes up to 4 single nonzeros anywhere in it:
//           slot s of lane l (byte 4l + s of the step) reads window byte
//           step_pos[j][4l + s] (low 6 bits; vpermb ignores the rest, and so
//           does the scalar path) times weight values[j][4l + s] (0 for an empty
//           slot). One vpermb gathers all 64 operands, so a step still costs one
//           permute and one vpdpbusd per row, but at 90% unstructured sparsity
//           it carries ~49 nonzeros instead of ~16 in 1x4 blocks (a block
//           holds 1.2 nonzeros on average): 3x fewer steps and 1.8x fewer bytes
//           (64 weight + 64 position bytes per step). Packed by the same greedy
//           rule over single nonzeros (zero weights of a block are skipped).
//           For 1x4-block pruning the group layout is smaller for the same
//           steps. step_lane is then uint8 [nsteps][64] positions (step_pos).
//
//   csr panels  fp32, derived from a validated csr pack by build_csr_panels
//           (never stored in a state_dict; SparseLinear rebuilds it, like the
//           sliced layout). The cols kernel below streams every nonzero's 16-row
//           x^T vector from cache: with x^T [K][M] larger than L1 (M=16, K=4096:
//           256 KiB) it runs at the L2 bandwidth (~2.3 cycles per nonzero on Zen
//           4), and for M=128 (2 MiB) at the L3 bandwidth. The panel layout tiles
//           K so a panel of x^T stays in L1/L2 while a block of output channels
//           runs over it, and stores the nonzeros in the order that loop reads
//           them (the tiled loop over a plain csr pack jumps between rows on
//           every panel and was slower than no tiling):
//             for each block of kPanelRows channels, for each panel of
//             kPanelCols columns, for each channel n of the block: the segment
//             of row n's nonzeros with k in the panel (csr order), then zero pads
//             up to a multiple of 4 entries (the kernel's unroll: no tail loop,
//             no unpredictable exit branch). A pad's index is K: the driver
//             appends a zero row K to x^T, so a pad adds 0 * 0 even when x holds
//             Inf or NaN. (K <= 65535 so K fits the uint16 index.)
//           sub int32 [segments + 1]: start of every segment, segments in the
//           order above (segment of channel n, panel o, in the block starting
//           at n0 with rows_b channels: n0 * panels + o * rows_b + (n - n0)),
//           sub[end] = entries.
//           idx uint16 [entries] (k, or K for a pad), values float [entries].
//           Sizes: entries <= nnz + 3 * N * panels.
//
//   bsr1x4 panels  int8, the same layout derived from a validated bsr1x4 pack
//           by build_bsr1x4_panels (never stored; SparseInt8Linear rebuilds
//           it): columns are the k/4 groups (K' = ceil(K/4) groups, panels of
//           kPanelCols groups = 2048 k), an entry is one 1x4 block (idx uint16
//           group, or K' for a pad; values int8 [entries][4], zero for a pad).
//           For M=16 rows the x^T panel is 512 groups x 64 bytes = 32 KiB: in
//           L1/L2, where the plain cols kernel reads x^T [K/4][16] (64 KiB at
//           K=4096) from L2 for every block.
//
// Kernels, two shapes of the same math, picked by the number of rows M:
//   rows  (M < kGatherMaxRows; fp32: M < kF32GatherMaxRows): for each output
//         channel, gather the activations a nonzero needs straight from
//         row-major x (vpgatherdd / vpgatherdps, 16 nonzeros per gather) and
//         reduce at the end. Decode (M = 1) streams the packed weights once
//         with no per-nonzero scalar work.
//   cols  (M >= kGatherMaxRows; fp32: M >= kF32GatherMaxRows): the activations
//         are transposed once per call so that 16 rows of one k are contiguous
//         (x^T [K][Mp], int8: [K/4][Mp] of 4-byte groups); each nonzero (or 1x4 block) is broadcast and multiplied
//         into up to 8 vectors = 128 rows: one weight load serves 128 rows.
//         Results for one output channel are a vector over rows; 16 channels
//         at a time are transposed in registers and stored as one contiguous
//         row piece per row (a store per channel and row into y, whose row
//         stride is often a power of two, kept hitting one L1 set).
//
//   cols over csr / bsr1x4 panels (from the cols kernel's M, when the module
//         passes the panel layout; csr on AVX-512 and AVX2, bsr1x4 on AVX-512
//         only: the AVX2 int8 cols kernel is vpmaddwd-bound, not cache-bound;
//         csr from M = 2 to kNarrowPanelRows with x^T rows of 8 floats, on both
//         paths by the AVX2 kernel): same math, per block of channels the
//         panel loop is outermost; each channel's partial sums live in a
//         per-thread scratch between panels. The driver hands it blocks of at
//         most kPanelBlockRows = 32 rows, so whole panel segments run against
//         an x^T panel of 512 columns x 16 or 32 rows (32 / 64 KiB, L1/L2).
//
//   sliced  (int8, any M; SparseInt8Linear uses it for M <= 8 when it needs
//         few enough steps, see pycompress/nn/sparse_linear.py): per slice of
//         16 channels and group of up to 4 rows, accumulators are 16 channel
//         lanes, so the epilogue and the store are contiguous vectors.
//
// int8 numbers are exactly those of the dense int8 GEMM (csrc/q8/q8_gemm.h):
// the activations are quantized by the same q8 quantize_rows kernels, int32
// accumulation has no intermediate saturation on any path (the AVX2 path uses
// vpmaddwd on zero-extended int16, never vpmaddubsw), and the epilogue
//   v = float(acc - zp[r] * col_sum[n]) * (scale[r] * w_scale[n]) + bias[n]; act(v)
// is the same IEEE float ops on every path: int8 results are bit-identical
// across ISAs. fp32 results differ across ISAs only by summation order (the
// tests bound it against a float64 reference); the fp32 epilogue (bias, act) is
// the shared bit-exact one.
//
// Safety: kernels trust the structure (indices < K, row_ptr monotonic and
// within nnz). validate_* check exactly that; the Python op runs them before a
// kernel ever sees a pack (memoized per tensor version, see pycompress/ops/sparse.py).
#pragma once

#include <cstdint>

#include "common/epilogue_math.h"
#include "common/isa.h"

namespace pycompress {

class ThreadTuner;  // common/thread_tuner.h

namespace sparse {

constexpr int64_t kMaxK = 65536;
// Below this many rows the gather kernel wins (one gather per row per 16
// nonzeros vs one FMA per nonzero per 16 rows); measured on Zen 4 with
// bench/bench_sparse.py.
constexpr int64_t kGatherMaxRows = 4;
// fp32: the gather kernel for M = 1 only. From M = 2 the cols kernel wins even
// without panels (4096x4096 at 90%, 1 thread, Zen 4, AVX-512 / AVX2: M=2 1185 /
// 1169 us against 1253 / 1259 gathering, M=3 1180 / 1171 against 1861 / 1868).
constexpr int64_t kF32GatherMaxRows = 2;
// Rows per block of the transposed path: 8 zmm accumulators per output channel.
constexpr int64_t kColsBlockRows = 128;
// Rows per block of the cols kernels over panels (at most 2 zmm of rows):
// 4096x4096 at 90%, M=128 on Zen 4: blocks of 32 rows ran in 0.63x the time of
// one 128-row block over 128-column panels (x^T panel reads from L1 / L2
// against L2 for 128 rows); the weights are then read once per 32 rows (from L3).
constexpr int64_t kPanelBlockRows = 32;
// Up to this many rows (and from 2) the fp32 panels run with x^T rows of 8
// floats (one ymm) instead of 16: half the activation bytes per nonzero. 4096x4096
// at 90%, 1 thread, Zen 4: M=2 / 3 / 4 / 8 in 783 / 786 / 782 / 791 us, against
// 1240 / 1846 (gather kernel) and 959 / 970 (16-float rows).
constexpr int64_t kNarrowPanelRows = 8;

enum class Format : int { Csr = 0, Nm24 = 1, Bsr1x4 = 2 };

constexpr int64_t kPanelRows = 256;
constexpr int64_t kPanelCols = 512;
constexpr int64_t kPanelMaxK = 65535;  // the pad index K must fit uint16

inline int64_t csr_panels_count(int64_t k) { return (k + kPanelCols - 1) / kPanelCols; }

struct CsrPanels {
  const int32_t* sub;      // [n * csr_panels_count(k) + 1]
  const uint16_t* idx;     // [entries]: k, or K for a pad
  const float* values;     // [entries]
};

struct F32Weights {
  Format format;           // Csr or Nm24
  int64_t n, k;
  const int32_t* row_ptr;  // Csr
  const uint16_t* col_idx; // Csr
  const uint32_t* nm_idx;  // Nm24, nm_words per row
  int64_t nm_words;
  const float* values;
  const CsrPanels* panels = nullptr;  // Csr, optional: the cols kernels' layout
};

struct Bsr1x4Panels {
  const int32_t* sub;      // [n * csr_panels_count(ceil(k/4)) + 1]
  const uint16_t* idx;     // [entries]: k/4 group, or ceil(k/4) for a pad
  const int8_t* values;    // [entries][4]
};

struct Q8Weights {
  int64_t n, k, kp;        // kp = round_up(k, 4)
  const int32_t* row_ptr;
  const uint16_t* blk_idx;
  const int8_t* values;
  const int32_t* col_sum;
  const float* w_scale;
  const Bsr1x4Panels* panels = nullptr;  // optional: the cols kernels' layout
};

// Output channels [n0, n1) for rows [0, m) of a row block.
struct F32Task {
  const F32Weights* w;
  int64_t n0, n1, m;
  const float* x;          // rows path: row-major, row stride ldx
  int64_t ldx;
  const float* xt;         // cols path: [k][ldxt], ldxt a multiple of 16
  int64_t ldxt;
  const float* bias;       // nullable
  Activation act;
  float* y;                // row stride ldy
  int64_t ldy;
};

struct Q8Task {
  const Q8Weights* w;
  int64_t n0, n1, m;
  const uint8_t* xq;       // rows path: quantized rows, row stride kp (padding k are 0)
  const uint32_t* xqt;     // cols path: [kp/4][ldxt] 4-byte groups, ldxt a multiple of 16
  int64_t ldxt;
  const float* row_scale;  // per row of this block
  const int32_t* row_zp;
  const float* bias;       // nullable
  Activation act;
  float* y;                // row stride ldy, or nullptr in raw mode
  int64_t ldy;
  int32_t* raw;            // raw accumulators (tests), row stride ldraw
  int64_t ldraw;
};

constexpr int64_t kSliceLanes = 16;
constexpr int64_t kSliceWindowGroups = 16;
constexpr int64_t kSliceWindowBytes = 4 * kSliceWindowGroups;

inline int64_t sliced_row_bytes(int64_t k) {
  const int64_t kp = (k + 3) / 4 * 4;
  return kp > 4 * kSliceWindowGroups ? kp : 4 * kSliceWindowGroups;
}

struct SlicedWeights {
  int64_t n, k;
  const int32_t* slice_ptr;   // [ceil(n/16) + 1]
  const uint16_t* step_base;  // [nsteps]: window start, a k/4 group (step_lane) or a byte (step_pos)
  const uint32_t* step_lane;  // [nsteps][2] nibbles (group layout), or nullptr
  const uint8_t* step_pos;    // [nsteps][64] window bytes (byte layout), or nullptr
  const int8_t* values;       // [nsteps][64]
  const int32_t* col_sum;
  const float* w_scale;
};

// Slices [s0, s1) for rows [0, m).
struct SlicedTask {
  const SlicedWeights* w;
  int64_t s0, s1, m;
  const uint8_t* xq;       // quantized rows, row stride ldq = sliced_row_bytes(k), zero padded
  int64_t ldq;
  const float* row_scale;
  const int32_t* row_zp;
  const float* bias;       // nullable
  Activation act;
  float* y;                // row stride ldy, or nullptr in raw mode
  int64_t ldy;
  int32_t* raw;            // raw accumulators (tests), row stride ldraw
  int64_t ldraw;
};

struct Kernels {
  void (*f32_rows)(const F32Task&);
  void (*f32_cols)(const F32Task&);   // nullptr: use f32_rows for every M
  // Cols kernel over csr panels (xt has a zero row K); nullptr: f32_cols.
  void (*f32_cols_panels)(const F32Task&);
  // The same for 2 to kNarrowPanelRows rows with x^T rows of 8 floats (ldxt 8); nullptr: f32_cols_panels.
  void (*f32_cols_panels_narrow)(const F32Task&);
  void (*q8_rows)(const Q8Task&);
  void (*q8_cols)(const Q8Task&);     // nullptr: use q8_rows for every M
  // Cols kernel over bsr1x4 panels (xqt has a zero group row ceil(K/4)); nullptr: q8_cols.
  void (*q8_cols_panels)(const Q8Task&);
  void (*q8_sliced)(const SlicedTask&);
  void (*q8_sliced_bytes)(const SlicedTask&);  // the byte layout (scalar where the ISA has no vpermb)
};

// The active level's table (sparse_dispatch.cpp, from the kernels of
// sparse_kernels.h: one file per op, tile and ISA).
const Kernels& kernels_for(Isa isa);
// Whether the active ISA runs the byte layout with a vector kernel (else the scalar spec).
bool sliced_bytes_vectorized();

// 2-bit index of stored value j in a row of nm24 indices.
inline int64_t nm24_k(const uint32_t* row_idx, int64_t j) {
  return 4 * (j >> 1) + ((row_idx[j >> 4] >> (2 * (j & 15))) & 3u);
}

// ---- validation, layouts and drivers (sparse_validate.cpp, sparse_layouts.cpp,
//      sparse_f32_linear.cpp, sparse_q8_linear.cpp) ----------------------------

// Throw std::invalid_argument naming what is wrong.
void validate_csr(const int32_t* row_ptr, int64_t n, const uint16_t* col_idx, int64_t nnz, int64_t k);
void validate_bsr1x4(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, int64_t nblocks, int64_t k);
// bytes: step_base are bytes of the byte layout, else k/4 groups.
void validate_sliced(const int32_t* slice_ptr, int64_t n, const uint16_t* step_base, int64_t nsteps, int64_t k,
                     bool bytes);

// Entries of the csr panel layout of a validated csr pack (first pass of build).
int64_t csr_panel_entries(const int32_t* row_ptr, int64_t n, const uint16_t* col_idx, int64_t k);
// Fills a csr panel layout (arrays sized by csr_panel_entries) from a validated csr pack.
void build_csr_panels(const int32_t* row_ptr, int64_t n, const uint16_t* col_idx, const float* values, int64_t k,
                      int32_t* sub, uint16_t* idx, float* out_values, int64_t entries);
// Throws std::invalid_argument unless sub has n * panels + 1
// monotonic entries from 0 to `entries`, every segment starts on a multiple of
// 4 and every index is <= K (K itself is the zero pad row).
void validate_csr_panels(const int32_t* sub, int64_t nsub, const uint16_t* idx, int64_t entries, int64_t n, int64_t k);

// The same for a validated bsr1x4 pack (columns = k/4 groups, 4-byte blocks).
int64_t bsr1x4_panel_entries(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, int64_t k);
void build_bsr1x4_panels(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, const int8_t* values, int64_t k,
                         int32_t* sub, uint16_t* idx, int8_t* out_values, int64_t entries);
void validate_bsr1x4_panels(const int32_t* sub, int64_t nsub, const uint16_t* idx, int64_t entries, int64_t n,
                            int64_t k);

// Steps of the sliced layout (bytes: the byte layout) of a validated bsr1x4
// pack (first pass of build).
int64_t sliced_steps(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, const int8_t* values, int64_t k,
                     bool bytes);
// Fills a sliced pack (arrays sized by sliced_steps) from a validated bsr1x4
// pack: step_lane [nsteps][2] for the group layout, or (bytes) step_pos
// [nsteps][64] for the byte layout (the other one is not touched).
void build_sliced(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, const int8_t* values, int64_t k,
                  bool bytes, int32_t* slice_ptr, uint16_t* step_base, uint32_t* step_lane, uint8_t* step_pos,
                  int8_t* out_values, int64_t nsteps);

struct F32LinearArgs {
  F32Weights w;
  const float* x;
  int64_t m, ldx;
  const float* bias;
  Activation act;
  float* y;
  int64_t ldy;
  int nthreads;
};
void f32_linear(const F32LinearArgs& a);

// The activation side of an int8 sparse call, common to the bsr1x4 and the
// sliced linears: x is quantized by the dense int8 GEMM's quantizer.
struct Q8Call {
  const float* x;
  int64_t m, ldx;
  const float* bias;
  Activation act;
  bool is_static;
  float static_scale;
  int32_t static_zp;
  float* y;
  int64_t ldy;
  int nthreads;
};

struct Q8LinearArgs : Q8Call {
  Q8Weights w;
};
void q8_linear(const Q8LinearArgs& a);

struct SlicedLinearArgs : Q8Call {
  SlicedWeights w;
  ThreadTuner* tuner = nullptr;  // nullable: learns the thread count of a plan's small calls
};
void sliced_linear(const SlicedLinearArgs& a);
// Test hook: raw accumulators of quantized rows q [m][sliced_row_bytes(k)].
void sliced_accumulate_raw(const SlicedWeights& w, const uint8_t* q, int64_t m, int32_t* out, int nthreads);

// Test hook: raw int32 accumulators of quantized rows q [m][kp] against the
// bsr1x4 weights, out [m][n], on the active ISA (and its rows or cols kernel
// chosen by m, as in q8_linear).
void q8_accumulate_raw(const Q8Weights& w, const uint8_t* q, int64_t m, int32_t* out, int nthreads);

}  // namespace sparse
}  // namespace pycompress
