// Driver for the int8 linear: validates sizes, quantizes the activations,
// splits the output into tiles and runs them on the thread pool with the
// active ISA's kernels. Compiled without ISA flags.
#include <algorithm>
#include <chrono>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/thread_pool.h"
#if PYCOMPRESS_X86
#include <emmintrin.h>
#endif
#include "common/thread_tuner.h"
#include "q4/q4_gemm.h"
#include "q8/q8_gemm.h"

namespace pycompress {
namespace q4 {

void block_prefix_sums(const uint8_t* q, int64_t m, int64_t kp, int64_t lda, int32_t* out, int64_t ldsum) {
  for (int64_t r = 0; r < m; ++r) {
    const uint8_t* row = q + r * lda;
    int32_t* p = out + r * ldsum;
    int32_t sum = 0;
    p[0] = 0;
    int64_t kb = 0;
#if PYCOMPRESS_X86
    // psadbw against zero: the sums of each 8 bytes of 16 (SSE2, every x86-64 CPU).
    for (; 8 * kb + 16 <= kp; kb += 2) {
      const __m128i sad = _mm_sad_epu8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8 * kb)),
                                       _mm_setzero_si128());
      sum += _mm_cvtsi128_si32(sad);
      p[kb + 1] = sum;
      sum += _mm_extract_epi16(sad, 4);
      p[kb + 2] = sum;
    }
#endif
    for (; kb < kp / kKBlock; ++kb) {
      for (int j = 0; j < kKBlock; ++j) sum += row[kKBlock * kb + j];
      p[kb + 1] = sum;
    }
  }
}

const Kernels& kernels_for(Isa isa) {
  static const Kernels& (*const tables[kIsaCount])() = {
      &kernels_scalar, PYCOMPRESS_X86_TABLE(kernels_avx2), PYCOMPRESS_X86_TABLE(kernels_avxvnni),
      PYCOMPRESS_X86_TABLE(kernels_avx512vnni), nullptr, PYCOMPRESS_X86_TABLE(kernels_amx)};
  return pick_kernels(isa, tables);
}

}  // namespace q4

namespace q8 {

const Kernels& kernels_for(Isa isa) {
  static const Kernels& (*const tables[kIsaCount])() = {
      &kernels_scalar, PYCOMPRESS_X86_TABLE(kernels_avx2), PYCOMPRESS_X86_TABLE(kernels_avxvnni),
      PYCOMPRESS_X86_TABLE(kernels_avx512vnni), nullptr, PYCOMPRESS_X86_TABLE(kernels_amx)};
  return pick_kernels(isa, tables);
}

namespace {

// Below this many multiply-adds per thread a call without a ThreadTuner runs
// on the calling thread: a (1, 768, 768) GEMV (590K MACs, ~6.8 us) takes 5.0
// or 8.5 us on two threads depending on where the host puts the two vCPUs
// (thread_tuner.h), and much longer when the second thread is asleep. A
// plan's calls learn the choice instead (ThreadTuner).
constexpr int64_t kMinMacsPerThread = int64_t{1} << 20;
// Rows per tile: the quantized rows of one tile stay in L2 beside its weights.
constexpr int64_t kMaxTileRows = 192;
constexpr int64_t kQuantizeTaskElements = 8192;
// Quantized activations per pass of a tall input (linear_shared_input).
constexpr int64_t kPassBytes = int64_t{2} << 20;

struct Scratch {
  std::vector<uint8_t> q;
  std::vector<uint8_t> packed;  // q packed for the AMX kernel (Kernels::pack_rows)
  std::vector<int32_t> ksum;  // per-row block prefix sums for 4-bit outputs (q4::Tile::row_ksum)
  std::vector<float> scale;
  std::vector<int32_t> zp;
  std::vector<uint8_t> nonfinite;
};

// One scratch per calling thread: concurrent callers never share buffers.
Scratch& thread_scratch(int64_t m, int64_t kp) {
  thread_local Scratch s;
  const size_t qbytes = static_cast<size_t>(m * kp);
  if (s.q.size() < qbytes) s.q.resize(qbytes);
  if (s.scale.size() < static_cast<size_t>(m)) {
    s.scale.resize(m);
    s.zp.resize(m);
    s.nonfinite.resize(m);
  }
  return s;
}

int effective_threads(int requested, int64_t work) { return threads_for_work(requested, work, kMinMacsPerThread); }

void check_k(int64_t k) {
  if (k > kMaxK) {
    throw std::invalid_argument("int8 linear: K=" + std::to_string(k) + " exceeds " +
                                std::to_string(kMaxK) +
                                ", beyond which an int32 accumulator of uint8*int8 products can overflow");
  }
}

// Splits rows [0, m) into row tiles: enough of them that every thread gets
// >= 4 tiles when the column tiles alone are too few.
int64_t rows_per_tile(int64_t m, int64_t n_tiles, int threads) {
  int64_t m_tiles = (m + kMaxTileRows - 1) / kMaxTileRows;
  while (n_tiles * m_tiles < 4 * threads && m_tiles < (m + 5) / 6) ++m_tiles;
  return (m + m_tiles - 1) / m_tiles;
}

// The kernels of a pass of m rows: an AMX table's fallback below its min_rows.
const Kernels& kernels_for_rows(const Kernels& kern, int64_t m) {
  return kern.pack_rows != nullptr && m < kern.min_rows ? *kern.fallback : kern;
}

// Rows [0, m) of q (stride lda) as gemm_tile reads them: q itself, or packed
// into `packed` for a table with pack_rows. Returns the base tile's a and lda.
// The packing is split over the threads by 16-row blocks, like the quantization before it.
std::pair<const uint8_t*, int64_t> tile_rows_operand(const Kernels& kern, const uint8_t* q, int64_t m, int64_t lda,
                                                     int64_t kp, std::vector<uint8_t>& packed, int nthreads) {
  if (kern.pack_rows == nullptr) return {q, lda};
  const int64_t blocks = (m + kAmxRows - 1) / kAmxRows, block_bytes = amx_block_bytes(kp);
  if (packed.size() < static_cast<size_t>(blocks * block_bytes)) packed.resize(blocks * block_bytes);
  const int64_t blocks_per_task = std::max<int64_t>(1, kQuantizeTaskElements / (kAmxRows * kp));
  const int64_t tasks = (blocks + blocks_per_task - 1) / blocks_per_task;
  uint8_t* out = packed.data();
  parallel_for(tasks, effective_threads(nthreads, m * kp * 16), [&](int64_t t) {
    const int64_t r0 = t * blocks_per_task * kAmxRows;
    kern.pack_rows(q + r0 * lda, std::min(blocks_per_task * kAmxRows, m - r0), lda, kp, out + r0 / kAmxRows * block_bytes);
  });
  return {out, block_bytes};
}

// Rows per tile as the kernels need them: packed rows go in whole 16-row blocks.
int64_t kernel_rows(const Kernels& kern, int64_t rows) {
  return kern.pack_rows != nullptr ? round_up(rows, kAmxRows) : rows;
}

// Row r0 of a tile_rows_operand (packed rows: r0 a multiple of 16, lda the bytes of a 16-row block).
const uint8_t* rows_from(const Kernels& kern, const uint8_t* a, int64_t lda, int64_t r0) {
  return a + (kern.pack_rows != nullptr ? r0 / kAmxRows : r0) * lda;
}

// The tile of rows [r0, r0 + rows) and columns [n0, n0 + kTileCols) of `base`.
GemmTile sub_tile(const Kernels& kern, const GemmTile& base, int64_t r0, int64_t rows, int64_t n0, int64_t n) {
  GemmTile tile = base;
  tile.m = std::min(rows, base.m - r0);
  tile.a = rows_from(kern, base.a, base.lda, r0);
  tile.n0 = n0;
  tile.ncols = std::min(kTileCols, n - n0);
  // Row-indexed epilogue operands and outputs are shifted so tiles see row 0.
  if (base.row_scale != nullptr) tile.row_scale = base.row_scale + r0;
  if (base.row_zp != nullptr) tile.row_zp = base.row_zp + r0;
  if (base.y != nullptr) tile.y = base.y + r0 * base.ldy;
  if (base.raw != nullptr) tile.raw = base.raw + r0 * base.ldraw;
  return tile;
}

void run_tiles(const Kernels& kern, void (*gemm_tile)(const GemmTile&), const GemmTile& base, int64_t n,
               int nthreads) {
  const int64_t m = base.m;
  const int64_t n_tiles = (n + kTileCols - 1) / kTileCols;
  const int threads = effective_threads(nthreads, m * n * base.kp);
  const int64_t rows = kernel_rows(kern, rows_per_tile(m, n_tiles, threads));
  const int64_t m_tiles = (m + rows - 1) / rows;
  parallel_for(n_tiles * m_tiles, threads, [&](int64_t t) {
    const int64_t mt = t / n_tiles, nt = t % n_tiles;
    gemm_tile(sub_tile(kern, base, mt * rows, rows, nt * kTileCols, n));
  });
}

// The geometry must describe exactly m rows of k columns that lie in the
// input or its zero padding; the Python layer derives it, this is the guard.
void check_im2col(const Im2col& g, int64_t m, int64_t k) {
  const bool positive = g.batch >= 0 && g.h > 0 && g.w > 0 && g.c > 0 && g.kh > 0 && g.kw > 0 && g.sh > 0 &&
                        g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0 && g.ho > 0 && g.wo > 0;
  const bool shape = positive && g.ho == (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1 &&
                     g.wo == (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1 &&
                     m == g.batch * g.ho * g.wo && k == g.kh * g.kw * g.c;
  // Pixels, rows and images must not overlap (a dimension of size 1 may have any stride, as in torch).
  const int64_t row_extent = (g.w - 1) * g.stride_w + g.c;
  const int64_t image_extent = (g.h - 1) * g.stride_h + row_extent;
  const bool strides = (g.w == 1 || g.stride_w >= g.c) && (g.h == 1 || g.stride_h >= row_extent) &&
                       (g.batch <= 1 || g.stride_n >= image_extent);
  if (!shape || !strides) {
    throw std::invalid_argument("int8 conv2d: inconsistent im2col geometry for M=" + std::to_string(m) +
                                " K=" + std::to_string(k));
  }
}

void check_output(const LinearOutput& out, int64_t k) {
  if (out.n <= 0) throw std::invalid_argument("int8 linear: bad output size N=" + std::to_string(out.n));
  if (out.ldy < out.n) throw std::invalid_argument("int8 linear: row stride smaller than row");
  if (out.w4 != nullptr) {
    const int64_t kp = round_up(k, q4::kKBlock);
    if (out.groups <= 0 || kp % out.groups != 0 || (kp / out.groups) % q4::kKBlock != 0 ||
        (out.groups > 1 && k % out.groups != 0)) {
      throw std::invalid_argument("int4 linear: " + std::to_string(out.groups) + " weight groups do not split K=" +
                                  std::to_string(k) + " into groups of a multiple of 8");
    }
  }
}

}  // namespace

void check_activation_format(int act_bits, bool is_static, float scale, int32_t zp, const char* what) {
  if (act_bits != 7 && act_bits != 8) {
    throw std::invalid_argument(std::string(what) + ": activation bits must be 7 or 8, got " +
                                std::to_string(act_bits));
  }
  const int32_t qmax = act_qmax(act_bits);
  if (is_static && (!(scale > 0.0f) || !(scale <= std::numeric_limits<float>::max()) || zp < 0 || zp > qmax)) {
    throw std::invalid_argument(std::string(what) + ": static activation scale must be finite and > 0, zero point in [0, " +
                                std::to_string(qmax) + "]");
  }
}

void fill_nonfinite_rows(const uint8_t* nonfinite, int64_t m, float* y, int64_t ldy, int64_t n) {
  for (int64_t r = 0; r < m; ++r) {
    if (nonfinite[r]) std::fill(y + r * ldy, y + r * ldy + n, std::numeric_limits<float>::quiet_NaN());
  }
}

void quantize_rows_parallel(const Kernels& kern, const QuantizeRows& base, int nthreads) {
  // ~8K activations per task: a (128, 384) input becomes 4 tasks, so the pass
  // uses both cores instead of costing ~10% of a MiniLM projection on one.
  const int64_t rows_per_task = std::max<int64_t>(1, kQuantizeTaskElements / std::max<int64_t>(1, base.k));
  const int64_t tasks = (base.m + rows_per_task - 1) / rows_per_task;
  parallel_for(tasks, effective_threads(nthreads, base.m * base.k * 16), [&](int64_t t) {
    QuantizeRows p = base;
    const int64_t r0 = t * rows_per_task;
    p.m = std::min(rows_per_task, base.m - r0);
    if (base.im2col != nullptr) {
      p.row0 = base.row0 + r0;
    } else {
      p.x = base.x + r0 * base.ldx;
    }
    p.q = base.q + r0 * base.kp;
    p.scale = base.scale + r0;
    p.zp = base.zp + r0;
    p.nonfinite = base.nonfinite + r0;
    kern.quantize_rows(p);
  });
}

void linear_shared_input(const SharedInput& in, const LinearOutput* outputs, int count) {
  if (in.m < 0 || in.k <= 0 || count <= 0) {
    throw std::invalid_argument("int8 linear: bad sizes M=" + std::to_string(in.m) + " K=" + std::to_string(in.k) +
                                " outputs=" + std::to_string(count));
  }
  check_k(in.k);
  if (in.im2col != nullptr) {
    check_im2col(*in.im2col, in.m, in.k);
  } else if (in.ldx < in.k) {
    throw std::invalid_argument("int8 linear: row stride smaller than row");
  }
  bool any_w4 = false;
  for (int i = 0; i < count; ++i) {
    check_output(outputs[i], in.k);
    any_w4 = any_w4 || outputs[i].w4 != nullptr;
  }
  check_activation_format(in.act_bits, in.is_static, in.static_scale, in.static_zp, "int8 linear");
  if (in.m == 0) return;
  const Kernels& kern = kernels_for(active_isa());
  const q4::Kernels& kern4 = q4::kernels_for(active_isa());
  const int64_t kp = round_up(in.k, kKGroup);
  // Quantized rows are padded with zeros to the longest packed K of the outputs.
  const int64_t lda = any_w4 ? round_up(in.k, q4::kKBlock) : kp;

  // Column tiles of every output, numbered consecutively: output i owns
  // [first_tile[i], first_tile[i + 1]).
  std::vector<int64_t> first_tile(static_cast<size_t>(count) + 1, 0);
  int64_t n_total = 0;
  for (int i = 0; i < count; ++i) {
    first_tile[i + 1] = first_tile[i] + (outputs[i].n + kTileCols - 1) / kTileCols;
    n_total += outputs[i].n;
  }
  const int64_t n_tiles = first_tile[count];

  // Rows go in passes of ~kPassBytes of quantized activations: each pass is
  // quantized, then multiplied, so the scratch stays small for a tall input
  // (a convolution's im2col rows: ResNet-18's 3x3 convs at batch 16 are 50K
  // rows of 576) and a pass is read back from cache.
  const int64_t pass_rows = std::max<int64_t>(kMaxTileRows, kPassBytes / lda);
  const int64_t pass = std::min(in.m, pass_rows);
  Scratch& s = thread_scratch(pass, lda);
  // A call of one pass (every call small enough to tune) may let the tuner
  // pick its GEMM threads; it then times the whole call.
  const ThreadTuner::Choice choice =
      ThreadTuner::choose(pass == in.m ? in.tuner : nullptr, in.nthreads, in.m * n_total * kp, kMinMacsPerThread);
  const auto start = choice.slot >= 0 ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  for (int64_t r0 = 0; r0 < in.m; r0 += pass) {
    const int64_t pm = std::min(pass, in.m - r0);
    QuantizeRows qr{in.im2col != nullptr ? nullptr : in.x + r0 * in.ldx, in.ldx, pm, in.k, lda, s.q.data(),
                    s.scale.data(), s.zp.data(), s.nonfinite.data(), in.is_static, in.static_scale, in.static_zp,
                    in.im2col, r0, act_qmax(in.act_bits)};
    quantize_rows_parallel(kern, qr, in.nthreads);
    const int64_t ldsum = lda / q4::kKBlock + 1;
    if (any_w4) {
      if (s.ksum.size() < static_cast<size_t>(pm * ldsum)) s.ksum.resize(pm * ldsum);
      q4::block_prefix_sums(s.q.data(), pm, lda, lda, s.ksum.data(), ldsum);
    }

    // int8 outputs: the kernels for this many rows, reading the rows as they need them.
    const Kernels& pk = kernels_for_rows(kern, pm);
    const auto gemm_tile = in.act_bits == 7 && pk.gemm_tile_u7 != nullptr ? pk.gemm_tile_u7 : pk.gemm_tile;
    // Packed with lda (>= every output's K): the same k steps for int8 and int4 outputs.
    const auto operand = tile_rows_operand(pk, s.q.data(), pm, lda, lda, s.packed, in.nthreads);

    const int threads = pass == in.m ? choice.threads : effective_threads(in.nthreads, pm * n_total * kp);
    const int64_t rows = kernel_rows(pk, rows_per_tile(pm, n_tiles, threads));
    const int64_t m_tiles = (pm + rows - 1) / rows;
    GemmTile base{};
    base.a = operand.first;
    base.lda = operand.second;
    base.m = pm;
    base.kp = kp;
    base.row_scale = s.scale.data();
    base.row_zp = s.zp.data();
    parallel_for(n_tiles * m_tiles, threads, [&](int64_t t) {
      const int64_t mt = t / n_tiles, nt = t % n_tiles;
      int i = 0;
      while (nt >= first_tile[i + 1]) ++i;
      const LinearOutput& out = outputs[i];
      const int64_t n0 = (nt - first_tile[i]) * kTileCols;
      const int64_t tr0 = mt * rows;
      if (out.w4 != nullptr) {
        q4::Tile tile{};
        tile.m = std::min(rows, pm - tr0);
        tile.a = s.q.data() + tr0 * lda;
        tile.lda = lda;
        tile.w = out.w4;
        tile.kp = lda;
        tile.groups = out.groups;
        tile.n0 = n0;
        tile.ncols = std::min(q4::kTileCols, out.n - n0);
        tile.row_scale = base.row_scale + tr0;
        tile.row_zp = base.row_zp + tr0;
        tile.row_ksum = s.ksum.data() + tr0 * ldsum;
        tile.ldsum = ldsum;
        tile.g_scale = out.g_scale;
        tile.corr = out.corr;
        tile.bias = out.bias;
        tile.act = out.act;
        tile.y = out.y + (r0 + tr0) * out.ldy;
        tile.ldy = out.ldy;
        if (pk.pack_rows != nullptr) {
          tile.packed = rows_from(pk, base.a, base.lda, tr0);
          tile.packed_ld = base.lda;
        }
        kern4.gemm_tile(tile);
        return;
      }
      GemmTile tile = base;
      tile.w = out.w_packed;
      tile.col_sum = out.col_sum;
      tile.w_scale = out.w_scale;
      tile.bias = out.bias;
      tile.act = out.act;
      tile.y = out.y + r0 * out.ldy;
      tile.ldy = out.ldy;
      gemm_tile(sub_tile(pk, tile, tr0, rows, n0, out.n));
    });
    for (int i = 0; i < count; ++i) {
      fill_nonfinite_rows(s.nonfinite.data(), pm, outputs[i].y + r0 * outputs[i].ldy, outputs[i].ldy, outputs[i].n);
    }
  }
  if (choice.slot >= 0) in.tuner->record(choice, std::chrono::steady_clock::now() - start);
}

void quantize_rows(const float* x, int64_t m, int64_t k, int64_t ldx, uint8_t* q, float* scale, int32_t* zp,
                   uint8_t* nonfinite, bool is_static, float static_scale, int32_t static_zp, int act_bits) {
  check_k(k);
  check_activation_format(act_bits, is_static, static_scale, static_zp, "q8_quantize_rows");
  const int64_t kp = round_up(k, kKGroup);
  QuantizeRows p{x, ldx, m, k, kp, q, scale, zp, nonfinite, is_static, static_scale, static_zp, nullptr, 0,
                 act_qmax(act_bits)};
  kernels_for(active_isa()).quantize_rows(p);
}

void gemm_raw(const uint8_t* q, int64_t m, int64_t kp, const int8_t* w_packed, int64_t n, int32_t* out,
              int nthreads, bool u7) {
  check_k(kp);
  if (kp % kKGroup != 0) {
    throw std::invalid_argument("q8_gemm_raw: row length " + std::to_string(kp) + " must be a multiple of 4");
  }
  if (m == 0) return;
  const Kernels& kern = kernels_for_rows(kernels_for(active_isa()), m);
  std::vector<uint8_t> packed;
  const auto operand = tile_rows_operand(kern, q, m, kp, kp, packed, nthreads);
  GemmTile tile{};
  tile.a = operand.first;
  tile.lda = operand.second;
  tile.m = m;
  tile.w = w_packed;
  tile.kp = kp;
  tile.raw = out;
  tile.ldraw = n;
  run_tiles(kern, u7 && kern.gemm_tile_u7 != nullptr ? kern.gemm_tile_u7 : kern.gemm_tile, tile, n, nthreads);
}

}  // namespace q8
}  // namespace pycompress
