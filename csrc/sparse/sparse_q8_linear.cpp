// Driver of the int8 sparse linears (bsr1x4 packs, their panels, the sliced
// layouts): validates sizes, quantizes the activations (the dense int8
// quantizer, so the numbers match Int8Linear's), transposes them when the cols
// kernels run, splits the work across threads and runs the active ISA's
// kernels. Compiled without ISA flags.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/thread_tuner.h"
#include "q8/q8_gemm.h"
#include "sparse/sparse.h"
#include "sparse/sparse_driver.h"

namespace pycompress {
namespace sparse {

using namespace internal;

namespace {

void q8_run(const Q8Weights& w, const uint8_t* q, int64_t m, const float* scale, const int32_t* zp, const float* bias,
            Activation act, float* y, int64_t ldy, int32_t* raw, int nthreads) {
  const Kernels& kern = kernels_for(active_isa());
  const int64_t nblk = w.row_ptr[w.n];
  const int threads = effective_threads(nthreads, std::max<int64_t>(4 * nblk, w.n) * m);
  const std::vector<int64_t> nb = split_by_nnz(w.row_ptr, w.n, threads == 1 ? 1 : threads * kChunksPerThread);
  const int64_t nchunks = static_cast<int64_t>(nb.size()) - 1;
  Q8Task base{};
  base.w = &w;
  base.bias = bias;
  base.act = act;
  base.ldy = ldy;
  base.ldraw = w.n;

  if (m < kGatherMaxRows || kern.q8_cols == nullptr) {
    const int64_t rows_per = kern.q8_cols == nullptr ? kColsBlockRows : m;
    const int64_t mblocks = (m + rows_per - 1) / rows_per;
    parallel_for(nchunks * mblocks, threads, [&](int64_t t) {
      Q8Task task = base;
      const int64_t r0 = (t / nchunks) * rows_per;
      task.m = std::min(rows_per, m - r0);
      task.n0 = nb[static_cast<size_t>(t % nchunks)];
      task.n1 = nb[static_cast<size_t>(t % nchunks) + 1];
      task.xq = q + r0 * w.kp;
      task.row_scale = scale + r0;
      task.row_zp = zp + r0;
      task.y = y != nullptr ? y + r0 * ldy : nullptr;
      task.raw = raw != nullptr ? raw + r0 * w.n : nullptr;
      kern.q8_rows(task);
    });
    return;
  }

  // The panel kernel reads a zero group row ceil(K/4) of x^T for its pads (sparse.h).
  const bool panels = w.panels != nullptr && kern.q8_cols_panels != nullptr;
  const int64_t groups = w.kp / 4;
  const int64_t xt_rows = panels ? groups + 1 : groups;
  const std::vector<RowBlock> blocks = row_blocks(m, xt_rows, panels ? kPanelBlockRows : kColsBlockRows);
  Scratch& s = thread_scratch();
  uint32_t* xt = grow_aligned(s.xt, blocks.back().offset + static_cast<size_t>(blocks.back().ld * xt_rows));
  transpose_blocks(reinterpret_cast<const uint32_t*>(q), groups, groups, blocks, xt, threads);
  if (panels) {
    for (const RowBlock& b : blocks) std::fill(xt + b.offset + groups * b.ld, xt + b.offset + (groups + 1) * b.ld, 0u);
  }
  const auto cols_kernel = panels ? kern.q8_cols_panels : kern.q8_cols;
  const int64_t nrb = static_cast<int64_t>(blocks.size());
  parallel_for(nchunks * nrb, threads, [&](int64_t t) {
    const RowBlock& b = blocks[static_cast<size_t>(t / nchunks)];
    Q8Task task = base;
    task.m = b.rows;
    task.n0 = nb[static_cast<size_t>(t % nchunks)];
    task.n1 = nb[static_cast<size_t>(t % nchunks) + 1];
    task.xqt = xt + b.offset;
    task.ldxt = b.ld;
    task.row_scale = scale + b.r0;
    task.row_zp = zp + b.r0;
    task.y = y != nullptr ? y + b.r0 * ldy : nullptr;
    task.raw = raw != nullptr ? raw + b.r0 * w.n : nullptr;
    cols_kernel(task);
  });
}

}  // namespace

namespace {

// The checks both int8 linears make of their call (what: the op, for errors).
void check_q8_call(const Q8Call& a, int64_t n, int64_t k, const char* what) {
  if (a.m < 0 || n < 1) throw std::invalid_argument(std::string(what) + ": bad sizes " + sizes(a.m, k, n));
  check_k(k, what);
  if (a.ldx < k || a.ldy < n) throw std::invalid_argument(std::string(what) + ": row stride smaller than row");
  q8::check_activation_format(8, a.is_static, a.static_scale, a.static_zp, what);
}

// Multiply-add slots of a sliced call: 64 per step (16 lanes x 4) and row.
int64_t sliced_work(const SlicedWeights& w, int64_t m) {
  const int64_t nsteps = w.slice_ptr[(w.n + kSliceLanes - 1) / kSliceLanes];
  return std::max<int64_t>(64 * nsteps, w.n) * m;
}

void sliced_run(const SlicedWeights& w, const uint8_t* q, int64_t m, const float* scale, const int32_t* zp,
                const float* bias, Activation act, float* y, int64_t ldy, int32_t* raw, int nthreads) {
  const Kernels& kern = kernels_for(active_isa());
  const int64_t slices = (w.n + kSliceLanes - 1) / kSliceLanes;
  const int threads = effective_threads(nthreads, sliced_work(w, m));
  const std::vector<int64_t> sb = split_by_nnz(w.slice_ptr, slices, threads == 1 ? 1 : threads * kChunksPerThread);
  const int64_t nchunks = static_cast<int64_t>(sb.size()) - 1;
  SlicedTask base{};
  base.w = &w;
  base.m = m;
  base.xq = q;
  base.ldq = sliced_row_bytes(w.k);
  base.row_scale = scale;
  base.row_zp = zp;
  base.bias = bias;
  base.act = act;
  base.y = y;
  base.ldy = ldy;
  base.raw = raw;
  base.ldraw = w.n;
  parallel_for(nchunks, threads, [&](int64_t t) {
    SlicedTask task = base;
    task.s0 = sb[static_cast<size_t>(t)];
    task.s1 = sb[static_cast<size_t>(t) + 1];
    (w.step_pos != nullptr ? kern.q8_sliced_bytes : kern.q8_sliced)(task);
  });
}

struct QuantizedRows {
  uint8_t* q;  // rows of ldq bytes
  float* scale;
  int32_t* zp;
  uint8_t* nonfinite;
};

// x quantized by the dense int8 GEMM's quantizer (identical numbers) into this
// thread's scratch, rows of ldq >= kp bytes. The quantizer writes rows of kp
// bytes; wider rows (the sliced windows read up to 64 bytes when K < 64) are
// quantized compactly and copied into zero-padded rows.
QuantizedRows quantize_x(const Q8Call& a, int64_t k, int64_t ldq) {
  const int64_t kp = (k + 3) / 4 * 4;
  Scratch& s = thread_scratch();
  const QuantizedRows out{grow(s.q, static_cast<size_t>(a.m * ldq)), grow(s.scale, static_cast<size_t>(a.m)),
                          grow(s.zp, static_cast<size_t>(a.m)), grow(s.nonfinite, static_cast<size_t>(a.m))};
  uint8_t* qc = ldq == kp ? out.q : grow(s.q_compact, static_cast<size_t>(a.m * kp));
  q8::quantize_rows_parallel(q8::kernels_for(active_isa()),
                             q8::QuantizeRows{a.x, a.ldx, a.m, k, kp, qc, out.scale, out.zp, out.nonfinite,
                                              a.is_static, a.static_scale, a.static_zp, nullptr, 0},
                             a.nthreads);
  if (qc != out.q) {
    for (int64_t r = 0; r < a.m; ++r) {
      std::memcpy(out.q + r * ldq, qc + r * kp, static_cast<size_t>(kp));
      std::memset(out.q + r * ldq + kp, 0, static_cast<size_t>(ldq - kp));
    }
  }
  return out;
}

}  // namespace

void q8_linear(const Q8LinearArgs& a) {
  const Q8Weights& w = a.w;
  check_q8_call(a, w.n, w.k, "sparse int8 linear");
  if (w.kp != (w.k + 3) / 4 * 4) throw std::invalid_argument("sparse int8 linear: kp must be K rounded up to 4");
  if (a.m == 0) return;
  const QuantizedRows x = quantize_x(a, w.k, w.kp);
  q8_run(w, x.q, a.m, x.scale, x.zp, a.bias, a.act, a.y, a.ldy, nullptr, a.nthreads);
  q8::fill_nonfinite_rows(x.nonfinite, a.m, a.y, a.ldy, w.n);
}

void sliced_linear(const SlicedLinearArgs& a) {
  const SlicedWeights& w = a.w;
  check_q8_call(a, w.n, w.k, "sparse sliced int8 linear");
  if (a.m == 0) return;
  const ThreadTuner::Choice choice = ThreadTuner::choose(a.tuner, a.nthreads, sliced_work(w, a.m), kMinMacsPerThread);
  const auto start = choice.slot >= 0 ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  const QuantizedRows x = quantize_x(a, w.k, sliced_row_bytes(w.k));
  sliced_run(w, x.q, a.m, x.scale, x.zp, a.bias, a.act, a.y, a.ldy, nullptr, choice.threads);
  q8::fill_nonfinite_rows(x.nonfinite, a.m, a.y, a.ldy, w.n);
  if (choice.slot >= 0) a.tuner->record(choice, std::chrono::steady_clock::now() - start);
}

void sliced_accumulate_raw(const SlicedWeights& w, const uint8_t* q, int64_t m, int32_t* out, int nthreads) {
  check_k(w.k, "sparse sliced accumulate");
  if (m <= 0) return;
  sliced_run(w, q, m, nullptr, nullptr, nullptr, Activation::None, nullptr, 0, out, nthreads);
}

void q8_accumulate_raw(const Q8Weights& w, const uint8_t* q, int64_t m, int32_t* out, int nthreads) {
  check_k(w.k, "sparse int8 accumulate");
  if (m <= 0) return;
  q8_run(w, q, m, nullptr, nullptr, nullptr, Activation::None, nullptr, 0, out, nthreads);
}


}  // namespace sparse
}  // namespace pycompress
