// int8 GEMM: y = dequant(quant_u8(x) @ W_s8^T) + b, with a fused epilogue.
//
// Numbers (the contract every ISA path implements bit for bit):
//   activations  per row r (dynamic) or per tensor (static): unsigned with zero point,
//                8 bits (qmax = 255) or 7 bits (qmax = 127, the u7 format),
//                q = clamp(nearbyint(clamp(x * inv_scale, -256, 256)) + zp, 0, qmax),
//                dynamic: lo = min(min(x), 0), hi = max(max(x), 0),
//                scale = max((hi - lo) / qmax, FLT_MIN), inv_scale = 1 / scale,
//                zp = clamp(nearbyint(-lo * inv_scale), 0, qmax).
//                u7 exists for AVX2: a u7 x s8 pair sum fits int16 (|127 * -128 * 2|
//                < 2^15), so vpmaddubsw is exact for it (it saturates for u8).
//   weights      int8, symmetric, one float scale per output channel.
//   accumulate   acc[r][n] = sum_k q[r][k] * w[n][k] in int32. |q*w| <= 255*128, so
//                K <= kMaxK = 65536 can never overflow: larger K is refused.
//   epilogue     v = float(acc - zp[r] * colsum[n]) * (scale[r] * wscale[n]),
//                v = v + bias[n], v = act(v); each step one IEEE float32 operation.
//   non-finite   a row of x holding NaN or +-Inf yields a row of NaN in y; the
//                other rows are unaffected.
//
// Packed weight layout (ISA independent, so a state_dict moves between CPUs):
//   Kp = round_up(K, 4), Np = round_up(N, 16), int8 [Np/16][Kp/4][16][4]:
//   panel p holds output channels 16p..16p+15; each 64-byte group holds 4
//   consecutive k for 16 channels, which is one VNNI vpdpbusd operand.
//   Padding is zero. colsum[n] = sum_k w[n][k] (int32, Np entries).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "common/epilogue_math.h"
#include "common/isa.h"

namespace pycompress {

class ThreadTuner;  // common/thread_tuner.h

namespace q8 {

constexpr int64_t kPanel = 16;
constexpr int64_t kKGroup = 4;
constexpr int64_t kMaxK = 65536;
constexpr int64_t kTileCols = 64;  // columns per driver tile (4 panels)
// Activations packed for the AMX kernel (Kernels::pack_rows): row block b (rows
// 16b..16b+15) and k step s (k 64s..64s+63) are one 1 KiB tile at
// (b * amx_steps(kp) + s) * 1024, 16 rows of 64 bytes, zeros past m and kp.
constexpr int64_t kAmxRows = 16;
constexpr int64_t kAmxK = 64;
constexpr int64_t kAmxTileBytes = kAmxRows * kAmxK;
inline int64_t amx_steps(int64_t kp) { return (kp + kAmxK - 1) / kAmxK; }
inline int64_t amx_block_bytes(int64_t kp) { return amx_steps(kp) * kAmxTileBytes; }
constexpr float kFltMin = FLT_MIN;
constexpr float kFltMax = FLT_MAX;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// One tile: rows [0, m) of the quantized activations against columns
// [n0, n0 + ncols) (n0 a multiple of kPanel, ncols <= kTileCols).
struct GemmTile {
  const uint8_t* a;        // quantized activations, row stride lda, Kp columns; packed
  int64_t lda;             // (Kernels::pack_rows): a's first row block, lda = amx_block_bytes
  int64_t m;
  const int8_t* w;         // packed weights (whole matrix)
  int64_t kp;
  int64_t n0, ncols;
  // Epilogue operands, indexed by row or absolute column.
  const float* row_scale;
  const int32_t* row_zp;
  const int32_t* col_sum;
  const float* w_scale;
  const float* bias;       // nullable
  Activation act;
  float* y;                // y + r * ldy + n, or nullptr in raw mode
  int64_t ldy;
  int32_t* raw;            // raw accumulators (tests): raw + r * ldraw + n
  int64_t ldraw;
};

// A convolution's GEMM rows read straight from its NHWC float input (im2col
// without the float copy): row r = (b, oh, ow) in that order, columns (i, j, c):
//   x[b][oh*sh - ph + i*dh][ow*sw - pw + j*dw][c], 0 outside the image.
// Strides are in floats; channels are contiguous.
struct Im2col {
  const float* x;
  int64_t stride_n, stride_h, stride_w;
  int64_t batch, h, w, c;
  int64_t ho, wo;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// The largest quantized activation of a format: 255 (u8) or 127 (u7).
inline int32_t act_qmax(int act_bits) { return act_bits == 7 ? 127 : 255; }

struct QuantizeRows {
  const float* x;          // rows x + r * ldx, or nullptr when im2col gives the rows
  int64_t ldx;
  int64_t m, k, kp;
  uint8_t* q;              // row stride kp; columns [k, kp) are written as 0
  float* scale;            // per row, out (dynamic) or filled with the static scale
  int32_t* zp;
  uint8_t* nonfinite;      // per row, out: 1 when the row held NaN/Inf
  bool is_static;
  float static_scale;
  int32_t static_zp;
  const Im2col* im2col;    // nullable; then row r is GEMM row row0 + r of the convolution
  int64_t row0;
  int32_t qmax = 255;      // act_qmax of the format
};

namespace {

// Calls fn(src, len, col) for the contiguous runs that make up row r, in
// column order: `len` floats at `src` are columns [col, col + len), and a null
// `src` is a run of zeros (the convolution's padding). A plain row is one run;
// an im2col row is one run per kernel tap (kh * kw runs of C floats), or one
// per kernel row when the taps of a row are adjacent in memory (dw == 1 and
// dense NHWC), which matters for a 3-channel first layer.
template <class Fn>
inline void for_each_run(const QuantizeRows& p, int64_t r, Fn&& fn) {
  if (p.im2col == nullptr) {
    fn(p.x + r * p.ldx, p.k, int64_t{0});
    return;
  }
  const Im2col& g = *p.im2col;
  const int64_t row = p.row0 + r;
  const int64_t ow = row % g.wo, oh = (row / g.wo) % g.ho, b = row / (g.wo * g.ho);
  const float* image = g.x + b * g.stride_n;
  const bool merge_row = g.dw == 1 && g.stride_w == g.c;
  const int64_t iw0 = ow * g.sw - g.pw;
  for (int64_t i = 0, col = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.sh - g.ph + i * g.dh;
    if (ih < 0 || ih >= g.h) {
      fn(static_cast<const float*>(nullptr), g.kw * g.c, col);
      col += g.kw * g.c;
      continue;
    }
    const float* line = image + ih * g.stride_h;
    if (merge_row) {
      // Taps j in [j0, j1) are inside the image and adjacent in memory.
      const int64_t j0 = iw0 < 0 ? std::min<int64_t>(-iw0, g.kw) : 0;
      const int64_t j1 = std::max<int64_t>(j0, std::min<int64_t>(g.kw, g.w - iw0));
      if (j0 > 0) fn(static_cast<const float*>(nullptr), j0 * g.c, col);
      if (j1 > j0) fn(line + (iw0 + j0) * g.stride_w, (j1 - j0) * g.c, col + j0 * g.c);
      if (j1 < g.kw) fn(static_cast<const float*>(nullptr), (g.kw - j1) * g.c, col + j1 * g.c);
      col += g.kw * g.c;
      continue;
    }
    for (int64_t j = 0; j < g.kw; ++j, col += g.c) {
      const int64_t iw = iw0 + j * g.dw;
      fn(iw >= 0 && iw < g.w ? line + iw * g.stride_w : nullptr, g.c, col);
    }
  }
}

// Quantization parameters of one row from its range, shared by every ISA's
// quantize_rows (internal linkage: included by TUs with different ISA flags).
// Returns false for a non-finite row, which then gets scale 1 and zero point 0.
struct RowParams {
  float scale;
  float inv_scale;
  int32_t zp;
};

inline bool row_params(const QuantizeRows& p, float lo, float hi, float nan_probe, RowParams* out) {
  float scale = p.static_scale;
  if (!p.is_static) {
    scale = (hi - lo) / static_cast<float>(p.qmax);
    scale = scale < kFltMin ? kFltMin : scale;
  }
  if (!(nan_probe == 0.0f) || !(scale <= kFltMax)) {
    *out = RowParams{1.0f, 1.0f, 0};
    return false;
  }
  const float inv_scale = 1.0f / scale;
  int32_t zp = p.static_zp;
  if (!p.is_static) {
    zp = static_cast<int32_t>(std::nearbyint(-lo * inv_scale));
    zp = zp < 0 ? 0 : (zp > p.qmax ? p.qmax : zp);
  }
  *out = RowParams{scale, inv_scale, zp};
  return true;
}

// The row loop of every ISA's quantize_rows: `range(x, len, &lo, &hi, &probe)`
// and `quantize(x, len, q, inv_scale, zp, qmax)` are the ISA's loops over one run
// (for_each_run). Runs of padding hold 0, which every range already holds, and
// quantize to zp (the formula's value for 0.0f); columns [k, kp) are 0.
template <class RangeFn, class QuantizeFn>
inline void quantize_rows_with(const QuantizeRows& p, RangeFn&& range, QuantizeFn&& quantize) {
  for (int64_t r = 0; r < p.m; ++r) {
    uint8_t* q = p.q + r * p.kp;
    float lo = 0.0f, hi = 0.0f, nan_probe = 0.0f;
    for_each_run(p, r, [&](const float* x, int64_t len, int64_t) {
      if (x == nullptr) return;
      float run_lo, run_hi, run_probe;
      range(x, len, &run_lo, &run_hi, &run_probe);
      lo = std::min(lo, run_lo);
      hi = std::max(hi, run_hi);
      nan_probe = nan_probe + run_probe;  // 0, or NaN once any run held NaN/Inf
    });
    RowParams rp;
    const bool finite = row_params(p, lo, hi, nan_probe, &rp);
    p.nonfinite[r] = finite ? 0 : 1;
    p.scale[r] = rp.scale;
    p.zp[r] = rp.zp;
    if (!finite) {
      std::fill(q, q + p.kp, uint8_t{0});
      continue;
    }
    for_each_run(p, r, [&](const float* x, int64_t len, int64_t col) {
      if (x == nullptr) {
        std::fill(q + col, q + col + len, static_cast<uint8_t>(rp.zp));
      } else {
        quantize(x, len, q + col, rp.inv_scale, rp.zp, p.qmax);
      }
    });
    std::fill(q + p.k, q + p.kp, uint8_t{0});
  }
}

}  // namespace

struct Kernels {
  void (*quantize_rows)(const QuantizeRows&);
  void (*gemm_tile)(const GemmTile&);
  // For u7 activations, where the ISA has a faster kernel that is exact only
  // for them (AVX2's vpmaddubsw); nullptr: gemm_tile serves u7 too.
  void (*gemm_tile_u7)(const GemmTile&) = nullptr;
  // AMX: gemm_tile reads activations packed by pack_rows(q, m, lda, kp, out)
  // into amx_block_bytes(kp) per 16 rows, and tiles start at multiples of 16
  // rows. A pass of fewer than min_rows rows (mostly padding in a 16-row tile)
  // runs `fallback`'s kernels on the row-major rows instead.
  void (*pack_rows)(const uint8_t* q, int64_t m, int64_t lda, int64_t kp, uint8_t* out) = nullptr;
  int64_t min_rows = 0;
  const Kernels* fallback = nullptr;
};

const Kernels& kernels_scalar();
#if PYCOMPRESS_X86
const Kernels& kernels_avx2();
const Kernels& kernels_avxvnni();  // the AVX2 quantizer, ymm vpdpbusd GEMM
const Kernels& kernels_avx512vnni();
const Kernels& kernels_amx();  // the AVX-512 quantizer, AMX tdpbusd GEMM on packed rows
#endif
const Kernels& kernels_for(Isa isa);

// ---- the driver (q8_linear.cpp) -------------------------------------------

// y_i = act_i(dequant(quant(x) @ W_i^T) + b_i) for one or more linears reading
// the same x (a transformer's query / key / value projections): x is quantized
// once and the tiles of every output go to the thread pool together, so the
// call costs one quantization and one fork/join instead of one per linear, and
// small N no longer leaves a thread idle. Each output is exactly what a call
// with that output alone gives: same quantized rows, same per-column
// accumulation and epilogue. Throws std::invalid_argument on inconsistent
// sizes. Releases nothing itself: the binding drops the GIL around it.
struct SharedInput {
  const float* x;          // rows x + r * ldx, unless im2col is set
  int64_t m, k, ldx;
  bool is_static;
  float static_scale;
  int32_t static_zp;
  int nthreads;
  const Im2col* im2col;    // nullable: a convolution's rows, read from its NHWC input
  ThreadTuner* tuner = nullptr;  // nullable: learns the thread count of a small repeated call (a plan's)
  int act_bits = 8;        // 8 (u8) or 7 (u7) activations
};

// One linear's weights: int8 (w_packed, col_sum, w_scale; q8_gemm.h), or 4-bit
// when w4 is set (w4, g_scale, corr, groups; q4/q4_gemm.h).
struct LinearOutput {
  const int8_t* w_packed;
  const int32_t* col_sum;
  const float* w_scale;
  const float* bias;       // nullable
  int64_t n;
  float* y;
  int64_t ldy;
  Activation act;
  const uint8_t* w4 = nullptr;
  const float* g_scale = nullptr;
  const float* corr = nullptr;
  int64_t groups = 0;
};

void linear_shared_input(const SharedInput& in, const LinearOutput* outputs, int count);

// The activation-quantization stage of a call, split over rows on the thread
// pool; the dense and the sparse int8 linears both use it, so their activation
// numbers are identical.
void quantize_rows_parallel(const Kernels& kern, const QuantizeRows& rows, int nthreads);

// Throws std::invalid_argument, naming `what`, unless act_bits is 7 or 8 and
// the static activation parameters are usable (scale finite and > 0, zero
// point in [0, act_qmax(act_bits)]).
void check_activation_format(int act_bits, bool is_static, float scale, int32_t zp, const char* what);

// The non-finite contract: rows of y whose input row held NaN/Inf become NaN.
void fill_nonfinite_rows(const uint8_t* nonfinite, int64_t m, float* y, int64_t ldy, int64_t n);

// Test hooks exposing each stage on its own, on the active ISA.
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t ldx, uint8_t* q, float* scale,
                   int32_t* zp, uint8_t* nonfinite, bool is_static, float static_scale,
                   int32_t static_zp, int act_bits);
// u7: run the u7 kernel (every q must be <= 127).
void gemm_raw(const uint8_t* q, int64_t m, int64_t kp, const int8_t* w_packed, int64_t n,
              int32_t* out, int nthreads, bool u7);

}  // namespace q8
}  // namespace pycompress
