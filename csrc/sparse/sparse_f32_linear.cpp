// Driver of the fp32 sparse linear (csr, nm24): validates sizes, transposes the
// activations when the cols kernels run, splits the output channels across
// threads by nonzero count and runs the active ISA's kernels. Compiled without
// ISA flags.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparse/sparse.h"
#include "sparse/sparse_driver.h"

namespace pycompress {
namespace sparse {

using namespace internal;

void f32_linear(const F32LinearArgs& a) {
  const F32Weights& w = a.w;
  if (a.m < 0 || w.n < 1) throw std::invalid_argument("sparse fp32 linear: bad sizes " + sizes(a.m, w.k, w.n));
  check_k(w.k, "sparse fp32 linear");
  if (w.format == Format::Nm24 && w.k % 4 != 0) {
    throw std::invalid_argument("sparse nm24: K=" + std::to_string(w.k) + " must be a multiple of 4");
  }
  if (a.ldx < w.k || a.ldy < w.n) throw std::invalid_argument("sparse fp32 linear: row stride smaller than row");
  if (a.m == 0) return;
  const Kernels& kern = kernels_for(active_isa());
  const int64_t nnz = w.format == Format::Csr ? w.row_ptr[w.n] : w.n * (w.k / 2);
  const int threads = effective_threads(a.nthreads, std::max<int64_t>(nnz, w.n) * a.m);
  const int32_t* balance = w.format == Format::Csr ? w.row_ptr : nullptr;
  const std::vector<int64_t> nb = split_by_nnz(balance, w.n, threads == 1 ? 1 : threads * kChunksPerThread);
  const int64_t nchunks = static_cast<int64_t>(nb.size()) - 1;

  F32Task base{};
  base.w = &w;
  base.bias = a.bias;
  base.act = a.act;
  base.ldy = a.ldy;

  // The panel layout, when passed, runs from 2 rows (sparse.h: kNarrowPanelRows).
  const bool panels = w.format == Format::Csr && w.panels != nullptr && kern.f32_cols_panels != nullptr;
  const bool narrow = panels && kern.f32_cols_panels_narrow != nullptr && a.m >= 2 && a.m <= kNarrowPanelRows;
  if (!narrow && (a.m < kF32GatherMaxRows || kern.f32_cols == nullptr)) {
    // Rows kernel: blocks of rows so large M still spreads over the threads.
    const int64_t rows_per = kern.f32_cols == nullptr ? kColsBlockRows : a.m;
    const int64_t mblocks = (a.m + rows_per - 1) / rows_per;
    parallel_for(nchunks * mblocks, threads, [&](int64_t t) {
      F32Task task = base;
      const int64_t r0 = (t / nchunks) * rows_per;
      task.m = std::min(rows_per, a.m - r0);
      task.n0 = nb[static_cast<size_t>(t % nchunks)];
      task.n1 = nb[static_cast<size_t>(t % nchunks) + 1];
      task.x = a.x + r0 * a.ldx;
      task.ldx = a.ldx;
      task.y = a.y + r0 * a.ldy;
      kern.f32_rows(task);
    });
    return;
  }

  // The panel kernel reads a zero row K of x^T for its pads (sparse.h).
  const int64_t xt_rows = panels ? w.k + 1 : w.k;
  const std::vector<RowBlock> blocks =
      row_blocks(a.m, xt_rows, panels ? kPanelBlockRows : kColsBlockRows, narrow ? kNarrowPanelRows : 16);
  Scratch& s = thread_scratch();
  uint32_t* xt = grow_aligned(s.xt, blocks.back().offset + static_cast<size_t>(blocks.back().ld * xt_rows));
  transpose_blocks(reinterpret_cast<const uint32_t*>(a.x), a.ldx, w.k, blocks, xt, threads);
  if (panels) {
    for (const RowBlock& b : blocks) std::fill(xt + b.offset + w.k * b.ld, xt + b.offset + (w.k + 1) * b.ld, 0u);
  }
  const auto cols_kernel = narrow ? kern.f32_cols_panels_narrow : panels ? kern.f32_cols_panels : kern.f32_cols;
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  parallel_for(nchunks * nblocks, threads, [&](int64_t t) {
    const RowBlock& b = blocks[static_cast<size_t>(t / nchunks)];
    F32Task task = base;
    task.m = b.rows;
    task.n0 = nb[static_cast<size_t>(t % nchunks)];
    task.n1 = nb[static_cast<size_t>(t % nchunks) + 1];
    task.xt = reinterpret_cast<const float*>(xt + b.offset);
    task.ldxt = b.ld;
    task.y = a.y + b.r0 * a.ldy;
    cols_kernel(task);
  });
}

}  // namespace sparse
}  // namespace pycompress
