// The loop of the cols kernels over a panel layout (sparse.h), free of any ISA
// so the AVX-512 and the AVX2 kernels share it: for the task's channels
// [n0, n1), per block of kPanelRows channels the panels are outermost, and
// each channel's partial sums (`lanes` 32-bit values: floats or int32 as raw
// bits) wait in a per-thread scratch between panels. Internal linkage, like
// every header included from translation units with different ISA flags.
#pragma once

#include <cstdint>
#include <vector>

#include "sparse/sparse.h"

namespace pycompress {
namespace sparse {
namespace {

// seg(part, j0, j1, first) adds segment [j0, j1) of a channel to its partial
// sums at `part` (uninitialized when `first`: the channel's first panel);
// after the last panel of a block, done(c0, channels, part_of) runs the
// epilogue of up to `Tile` channels from c0, part_of(c) pointing at channel
// c0 + c's sums. Sums are `Align`-lane aligned.
template <int64_t Lanes, int64_t Tile, int64_t Align, class Seg, class Done>
inline void panels_loop(int64_t n0, int64_t n1, int64_t n, int64_t panels, const int32_t* sub_all, Seg&& seg,
                        Done&& done) {
  thread_local std::vector<uint32_t> scratch;  // one per worker thread: never shared
  const size_t size = static_cast<size_t>(kPanelRows * Lanes + Align);
  if (scratch.size() < size) scratch.resize(size);
  uint32_t* part =
      scratch.data() + (Align - reinterpret_cast<uintptr_t>(scratch.data()) / sizeof(uint32_t) % Align) % Align;
  for (int64_t b0 = n0 / kPanelRows * kPanelRows; b0 < n1; b0 += kPanelRows) {
    const int64_t rows_b = n - b0 < kPanelRows ? n - b0 : kPanelRows;
    const int64_t r0 = n0 > b0 ? n0 : b0;
    const int64_t r1 = n1 < b0 + rows_b ? n1 : b0 + rows_b;
    for (int64_t o = 0; o < panels; ++o) {
      const int32_t* sub = sub_all + b0 * panels + o * rows_b;
      for (int64_t c = r0; c < r1; ++c) seg(part + (c - r0) * Lanes, sub[c - b0], sub[c - b0 + 1], o == 0);
    }
    for (int64_t c0 = r0; c0 < r1; c0 += Tile) {
      done(c0, r1 - c0 < Tile ? r1 - c0 : Tile, [&](int c) { return part + (c0 - r0 + c) * Lanes; });
    }
  }
}

}  // namespace
}  // namespace sparse
}  // namespace pycompress
