// What the fp32 and int8 sparse drivers share: the thread split by nonzero
// count, the activation transpose of the cols kernels, per-thread scratch
// (internal; compiled without ISA flags).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/thread_pool.h"
#include "sparse/sparse.h"
#include "sparse/sparse_checks.h"

namespace pycompress {
namespace sparse {
namespace internal {

// Below this many multiply-adds per thread a helper thread costs more than it
// saves (its wake-up is ~10-50 us in a VM).
inline constexpr int64_t kMinMacsPerThread = int64_t{1} << 17;
// Work of one output channel beyond its nonzeros (reduction, epilogue, store),
// in nonzero equivalents: keeps the split fair at very high sparsity.
inline constexpr int64_t kRowOverhead = 8;
// Chunks per thread: dynamic hand-out evens out the rest of the imbalance.
inline constexpr int64_t kChunksPerThread = 4;

inline int effective_threads(int requested, int64_t work) { return threads_for_work(requested, work, kMinMacsPerThread); }

// Boundaries b[0] = 0 < ... < b[parts] = n of output channels so each part
// holds about the same nonzeros (row_ptr) plus a fixed per-channel cost.
// row_ptr == nullptr: every channel holds the same work (nm24).
inline std::vector<int64_t> split_by_nnz(const int32_t* row_ptr, int64_t n, int64_t parts) {
  parts = std::max<int64_t>(1, std::min(parts, n));
  auto cost = [&](int64_t i) { return (row_ptr != nullptr ? int64_t{row_ptr[i]} : 0) + kRowOverhead * i; };
  const int64_t total = cost(n);
  std::vector<int64_t> b{0};
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    int64_t lo = b.back(), hi = n;  // first i with cost(i) >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (cost(mid) < target) lo = mid + 1; else hi = mid;
    }
    if (lo > b.back() && lo < n) b.push_back(lo);
  }
  b.push_back(n);
  return b;
}

// dst[c][r] = src[r][c] for 32-bit elements, r < rows, c < cols; dst row
// stride ld >= rows, rows [rows, ld) of dst are zeroed (the cols kernels run
// whole vectors of rows). Tiled 16 x 16: the tile's source lines are copied
// into a local buffer first, because with a power-of-two row stride (K=4096:
// 16 KiB) the 16 lines map to one L1 set of 8 ways, and reading them column by
// column missed L1 on nearly every element.
inline void transpose32(const uint32_t* src, int64_t rows, int64_t lds, uint32_t* dst, int64_t ld, int64_t c0, int64_t c1) {
  constexpr int64_t kTile = 16;
  uint32_t tile[kTile][kTile];
  for (int64_t cb = c0; cb < c1; cb += kTile) {
    const int64_t ce = std::min(cb + kTile, c1);
    for (int64_t rb = 0; rb < rows; rb += kTile) {
      const int64_t re = std::min(rb + kTile, rows);
      for (int64_t r = rb; r < re; ++r) std::memcpy(tile[r - rb], src + r * lds + cb, sizeof(uint32_t) * (ce - cb));
      for (int64_t c = cb; c < ce; ++c) {
        uint32_t* d = dst + c * ld;
        for (int64_t r = rb; r < re; ++r) d[r] = tile[r - rb][c - cb];
      }
    }
    for (int64_t c = cb; c < ce; ++c) std::fill(dst + c * ld + rows, dst + c * ld + ld, 0u);
  }
}

struct RowBlock {
  int64_t r0, rows, ld;  // ld = rows rounded up to the kernel's lanes (16, or 8 for the narrow panels)
  size_t offset;         // of its transposed activations in the scratch buffer
};

inline std::vector<RowBlock> row_blocks(int64_t m, int64_t k_elems, int64_t block_rows, int64_t lanes = 16) {
  std::vector<RowBlock> blocks;
  size_t offset = 0;
  for (int64_t r0 = 0; r0 < m; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, m - r0);
    const int64_t ld = (rows + lanes - 1) / lanes * lanes;
    blocks.push_back({r0, rows, ld, offset});
    offset += static_cast<size_t>(ld * k_elems);
  }
  return blocks;
}

// Transposes 32-bit activations src [m][k_elems] (row stride lds) into one
// [k_elems][ld] buffer per row block, in parallel over (block, k chunk).
inline void transpose_blocks(const uint32_t* src, int64_t lds, int64_t k_elems, const std::vector<RowBlock>& blocks,
                      uint32_t* dst, int nthreads) {
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (k_elems + kChunk - 1) / kChunk;
  const int64_t tasks = chunks * static_cast<int64_t>(blocks.size());
  parallel_for(tasks, nthreads, [&](int64_t t) {
    const RowBlock& b = blocks[static_cast<size_t>(t / chunks)];
    const int64_t c0 = (t % chunks) * kChunk;
    transpose32(src + b.r0 * lds, b.rows, lds, dst + b.offset, b.ld, c0, std::min(c0 + kChunk, k_elems));
  });
}

template <typename T>
inline T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Transposed activations start on a cache line: every row vector the cols
// kernels load is then one whole line (a line-split zmm load costs twice as
// much and made the int8 cols kernel ~2x slower).
inline uint32_t* grow_aligned(std::vector<uint32_t>& v, size_t n) {
  constexpr size_t kLine = 64 / sizeof(uint32_t);
  uint32_t* p = grow(v, n + kLine);
  const size_t misalign = (reinterpret_cast<uintptr_t>(p) / sizeof(uint32_t)) % kLine;
  return misalign == 0 ? p : p + (kLine - misalign);
}

struct Scratch {
  std::vector<uint32_t> xt;
  std::vector<uint8_t> q;
  std::vector<uint8_t> q_compact;
  std::vector<float> scale;
  std::vector<int32_t> zp;
  std::vector<uint8_t> nonfinite;
};

// One scratch per calling thread: concurrent callers never share buffers.
inline Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

}  // namespace internal
}  // namespace sparse
}  // namespace pycompress
