// Driver of the fused attention: validates the operands' sizes and strides,
// splits (batch, head, query-row chunk) tasks over the thread pool, gives each
// thread its scratch, and runs the active ISA's kernel. No ISA flags.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "common/thread_pool.h"

namespace pycompress {
namespace attention {

const Kernels& kernels_for(Isa isa) {
  static const Kernels& (*const tables[kIsaCount])() = {
      &kernels_scalar, PYCOMPRESS_X86_TABLE(kernels_avx2), nullptr, PYCOMPRESS_X86_TABLE(kernels_avx512vnni),
      nullptr, nullptr};
  return pick_kernels(isa, tables);
}

namespace {

// Below this many multiply-adds per thread a call stays on the calling thread:
// waking a second thread costs ~5-10 us (csrc/q8/q8_linear.cpp), about the time of
// 2^19 fp32 multiply-adds on one AVX-512 core.
constexpr int64_t kMinMacsPerThread = int64_t{1} << 19;
// Chunks shorter than this repack K^T too often for the rows they serve.
constexpr int64_t kMinChunkRows = 32;

std::string sizes(const AttentionArgs& a) {
  return "B=" + std::to_string(a.batch) + " H=" + std::to_string(a.heads) + " Sq=" + std::to_string(a.sq) +
         " Sk=" + std::to_string(a.sk) + " D=" + std::to_string(a.d) + " Dv=" + std::to_string(a.dv);
}

void validate(const AttentionArgs& a) {
  if (a.batch < 0 || a.heads < 0 || a.sq < 0 || a.sk < 0 || a.d < 1 || a.dv < 1) {
    throw std::invalid_argument("attention: bad sizes " + sizes(a) + " (expected B, H, Sq, Sk >= 0 and D, Dv >= 1)");
  }
  if (a.mask_kind != MaskKind::None && a.mask_kind != MaskKind::Additive && a.mask_kind != MaskKind::Bool) {
    throw std::invalid_argument("attention: mask kind must be 0 (none), 1 (additive float) or 2 (bool)");
  }
  const int64_t work = a.batch * a.heads * a.sq;
  if (work > 0 && (a.q == nullptr || a.out == nullptr)) throw std::invalid_argument("attention: null q or out");
  if (work > 0 && a.sk > 0 && (a.k == nullptr || a.v == nullptr)) throw std::invalid_argument("attention: null k or v");
  if (work > 0 && a.sk > 0 && a.mask_kind != MaskKind::None && a.mask == nullptr) {
    throw std::invalid_argument("attention: mask kind given without a mask");
  }
}

struct Scratch {
  std::vector<float> kt, s, o, m, l;
};

Workspace thread_workspace(const Kernels& kern, const AttentionArgs& a, int64_t chunk_rows) {
  thread_local Scratch s;
  const int64_t ldk = round_up(key_block(a.d), kPad);
  const auto grow = [](std::vector<float>& v, int64_t n) {
    if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  };
  grow(s.kt, a.d * ldk);
  grow(s.s, kern.score_row_of_sk ? a.sk : kMaxTileRows * ldk);
  grow(s.o, chunk_rows * round_up(a.dv, kPad));
  grow(s.m, chunk_rows);
  grow(s.l, chunk_rows);
  return Workspace{s.kt.data(), s.s.data(), s.o.data(), s.m.data(), s.l.data()};
}

}  // namespace

void attention(const AttentionArgs& args) {
  validate(args);
  const int64_t heads_total = args.batch * args.heads;
  if (heads_total == 0 || args.sq == 0) return;
  const Kernels& kern = kernels_for(active_isa());
  // Multiply-adds of the call, saturated (the product of five sizes can pass 2^63).
  const double macs = static_cast<double>(heads_total) * args.sq * std::max<int64_t>(args.sk, 1) * (args.d + args.dv);
  const int64_t work = macs < 1e18 ? static_cast<int64_t>(macs) : int64_t{1000000000000000000};
  const int threads = threads_for_work(args.nthreads, work, kMinMacsPerThread);
  // Enough tasks for dynamic scheduling to even out the threads (causal rows differ
  // in work), without chunks so short that K^T is repacked for few rows.
  int64_t chunks = (args.sq + kMaxChunkRows - 1) / kMaxChunkRows;
  const int64_t max_chunks = std::max<int64_t>(1, args.sq / kMinChunkRows);
  while (heads_total * chunks < 4 * threads && chunks < max_chunks) ++chunks;
  const int64_t rows = round_up((args.sq + chunks - 1) / chunks, kMaxTileRows);
  chunks = (args.sq + rows - 1) / rows;
  parallel_for(heads_total * chunks, threads, [&](int64_t t) {
    const int64_t bh = t / chunks, c = t % chunks;
    const int64_t r0 = c * rows, r1 = std::min(args.sq, r0 + rows);
    kern.attend_rows(args, bh / args.heads, bh % args.heads, r0, r1, thread_workspace(kern, args, rows));
  });
}

void exp2_active(const float* x, float* y, int64_t n) { kernels_for(active_isa()).exp2_n(x, y, n); }

}  // namespace attention
}  // namespace pycompress
