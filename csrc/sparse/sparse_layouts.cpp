// The derived layouts of a validated pack (sparse.h): the sliced layouts
// (groups and bytes) of a bsr1x4 pack, and the K-panel layouts of csr and
// bsr1x4 packs. Compiled without ISA flags.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparse/sparse.h"
#include "sparse/sparse_checks.h"

namespace pycompress {
namespace sparse {

using namespace internal;

namespace {

// The greedy slicing of sparse.h, shared by the counting and the filling pass:
// emit(slice, base, take) is called once per step, take[l] = block of lane l
// or -1 for a pad.
template <typename Emit>
void slice_greedy(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, int64_t k, Emit emit) {
  const int64_t last_base = sliced_row_bytes(k) / 4 - kSliceWindowGroups;
  const int64_t slices = (n + kSliceLanes - 1) / kSliceLanes;
  for (int64_t s = 0; s < slices; ++s) {
    int64_t next[kSliceLanes], end[kSliceLanes], take[kSliceLanes];
    for (int64_t l = 0; l < kSliceLanes; ++l) {
      const int64_t ch = s * kSliceLanes + l;
      next[l] = ch < n ? row_ptr[ch] : 0;
      end[l] = ch < n ? row_ptr[ch + 1] : 0;
    }
    for (;;) {
      int64_t base = std::numeric_limits<int64_t>::max();
      for (int64_t l = 0; l < kSliceLanes; ++l) {
        if (next[l] < end[l]) base = std::min<int64_t>(base, blk_idx[next[l]]);
      }
      if (base == std::numeric_limits<int64_t>::max()) break;
      base = std::min(base, last_base);
      for (int64_t l = 0; l < kSliceLanes; ++l) {
        take[l] = -1;
        // Blocks of a lane are normally sorted; an unsorted (still valid)
        // pack only costs extra steps: a block below the window waits for a
        // window that starts at it.
        if (next[l] < end[l] && blk_idx[next[l]] >= base && blk_idx[next[l]] < base + kSliceWindowGroups) {
          take[l] = next[l]++;
        }
      }
      emit(s, base, take);
    }
  }
}

}  // namespace

namespace {

// The greedy slicing of the byte layout (sparse.h), over single nonzeros:
// emit(slice, base, take) once per step, take[4l + s] = element (4 * block +
// byte) of lane l's slot s, or -1 for an empty slot.
template <typename Emit>
void slice_bytes_greedy(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, const int8_t* values, int64_t k,
                        Emit emit) {
  const int64_t last_base = sliced_row_bytes(k) - kSliceWindowBytes;
  const int64_t slices = (n + kSliceLanes - 1) / kSliceLanes;
  auto k_of = [&](int64_t e) { return 4 * static_cast<int64_t>(blk_idx[e >> 2]) + (e & 3); };
  for (int64_t s = 0; s < slices; ++s) {
    int64_t next[kSliceLanes], end[kSliceLanes], take[4 * kSliceLanes];
    auto skip_zeros = [&](int64_t l) {
      while (next[l] < end[l] && values[next[l]] == 0) ++next[l];
    };
    for (int64_t l = 0; l < kSliceLanes; ++l) {
      const int64_t ch = s * kSliceLanes + l;
      next[l] = ch < n ? 4 * static_cast<int64_t>(row_ptr[ch]) : 0;
      end[l] = ch < n ? 4 * static_cast<int64_t>(row_ptr[ch + 1]) : 0;
      skip_zeros(l);
    }
    for (;;) {
      int64_t base = std::numeric_limits<int64_t>::max();
      for (int64_t l = 0; l < kSliceLanes; ++l) {
        if (next[l] < end[l]) base = std::min(base, k_of(next[l]));
      }
      if (base == std::numeric_limits<int64_t>::max()) break;
      base = std::min(base, last_base);
      for (int64_t l = 0; l < kSliceLanes; ++l) {
        int64_t c = 0;
        // As in slice_greedy, an unsorted lane only costs extra steps.
        for (; c < 4 && next[l] < end[l]; ++c) {
          const int64_t kk = k_of(next[l]);
          if (kk < base || kk >= base + kSliceWindowBytes) break;
          take[4 * l + c] = next[l]++;
          skip_zeros(l);
        }
        for (; c < 4; ++c) take[4 * l + c] = -1;
      }
      emit(s, base, take);
    }
  }
}

// Calls the byte or the group greedy slicing with emit(slice, base, take).
template <typename Emit>
void slice_any(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, const int8_t* values, int64_t k, bool bytes,
               Emit emit) {
  if (bytes) {
    slice_bytes_greedy(row_ptr, n, blk_idx, values, k, emit);
  } else {
    slice_greedy(row_ptr, n, blk_idx, k, emit);
  }
}

}  // namespace

int64_t sliced_steps(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, const int8_t* values, int64_t k,
                     bool bytes) {
  int64_t steps = 0;
  slice_any(row_ptr, n, blk_idx, values, k, bytes, [&](int64_t, int64_t, const int64_t*) { ++steps; });
  if (steps > std::numeric_limits<int32_t>::max()) throw std::invalid_argument("sparse sliced: too many steps for int32 slice pointers");
  return steps;
}

void build_sliced(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, const int8_t* values, int64_t k,
                  bool bytes, int32_t* slice_ptr, uint16_t* step_base, uint32_t* step_lane, uint8_t* step_pos,
                  int8_t* out_values, int64_t nsteps) {
  int64_t j = 0;
  int64_t cur_slice = 0;
  slice_ptr[0] = 0;
  slice_any(row_ptr, n, blk_idx, values, k, bytes, [&](int64_t s, int64_t base, const int64_t* take) {
    if (j >= nsteps) throw std::invalid_argument("sparse sliced: more steps than allocated");
    for (; cur_slice < s; ++cur_slice) slice_ptr[cur_slice + 1] = static_cast<int32_t>(j);
    step_base[j] = static_cast<uint16_t>(base);
    int8_t* v = out_values + 64 * j;
    if (bytes) {
      uint8_t* pos = step_pos + 64 * j;
      for (int64_t i = 0; i < 4 * kSliceLanes; ++i) {
        const bool empty = take[i] < 0;
        pos[i] = empty ? 0 : static_cast<uint8_t>(4 * static_cast<int64_t>(blk_idx[take[i] >> 2]) + (take[i] & 3) - base);
        v[i] = empty ? 0 : values[take[i]];
      }
    } else {
      uint32_t words[2] = {0, 0};
      for (int64_t l = 0; l < kSliceLanes; ++l) {
        if (take[l] < 0) {
          std::memset(v + 4 * l, 0, 4);
          continue;
        }
        const uint32_t offset = static_cast<uint32_t>(blk_idx[take[l]] - base);
        words[l & 1] |= offset << (4 * (l >> 1));
        std::memcpy(v + 4 * l, values + 4 * take[l], 4);
      }
      step_lane[2 * j] = words[0];
      step_lane[2 * j + 1] = words[1];
    }
    ++j;
  });
  const int64_t slices = (n + kSliceLanes - 1) / kSliceLanes;
  for (; cur_slice < slices; ++cur_slice) slice_ptr[cur_slice + 1] = static_cast<int32_t>(j);
  if (j != nsteps) throw std::invalid_argument("sparse sliced: fewer steps than allocated");
}

namespace {

// Visits the csr panel layout of a validated csr pack in storage order:
// entry(k, value_index) per entry (value_index < 0 for a pad), sub_start()
// before every segment. Columns of a row are bucketed by panel with a
// counting pass, so unsorted (still valid) rows land in the right panel too.
template <typename SubStart, typename Entry>
void csr_panels_walk(const int32_t* row_ptr, int64_t n, const uint16_t* col_idx, int64_t k, SubStart sub_start,
                     Entry entry) {
  const int64_t panels = csr_panels_count(k);
  std::vector<std::vector<int64_t>> row_order(static_cast<size_t>(kPanelRows));
  std::vector<std::vector<int64_t>> row_first(static_cast<size_t>(kPanelRows));
  for (int64_t b0 = 0; b0 < n; b0 += kPanelRows) {
    const int64_t rows_b = std::min(kPanelRows, n - b0);
    for (int64_t i = 0; i < rows_b; ++i) {  // bucket each row of the block by panel
      const int64_t j0 = row_ptr[b0 + i], j1 = row_ptr[b0 + i + 1];
      std::vector<int64_t>& f = row_first[static_cast<size_t>(i)];
      std::vector<int64_t>& ord = row_order[static_cast<size_t>(i)];
      f.assign(static_cast<size_t>(panels + 1), 0);
      for (int64_t j = j0; j < j1; ++j) ++f[static_cast<size_t>(col_idx[j] / kPanelCols + 1)];
      for (int64_t o = 0; o < panels; ++o) f[static_cast<size_t>(o + 1)] += f[static_cast<size_t>(o)];
      ord.assign(static_cast<size_t>(j1 - j0), 0);
      std::vector<int64_t> fill(f.begin(), f.end() - 1);
      for (int64_t j = j0; j < j1; ++j) ord[static_cast<size_t>(fill[static_cast<size_t>(col_idx[j] / kPanelCols)]++)] = j;
    }
    for (int64_t o = 0; o < panels; ++o) {
      for (int64_t i = 0; i < rows_b; ++i) {
        const std::vector<int64_t>& f = row_first[static_cast<size_t>(i)];
        const std::vector<int64_t>& ord = row_order[static_cast<size_t>(i)];
        int64_t count = 0;
        sub_start();
        for (int64_t e = f[static_cast<size_t>(o)]; e < f[static_cast<size_t>(o + 1)]; ++e, ++count) {
          entry(static_cast<int64_t>(col_idx[ord[static_cast<size_t>(e)]]), ord[static_cast<size_t>(e)]);
        }
        for (; count % 4 != 0; ++count) entry(k, -1);
      }
    }
  }
}

}  // namespace

int64_t csr_panel_entries(const int32_t* row_ptr, int64_t n, const uint16_t* col_idx, int64_t k) {
  check_panel_k(k);
  int64_t entries = 0;
  csr_panels_walk(row_ptr, n, col_idx, k, [] {}, [&](int64_t, int64_t) { ++entries; });
  if (entries > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("sparse csr panels: too many entries for int32 pointers");
  }
  return entries;
}

namespace {

// Shared by both layouts: entries are 4 bytes (a float or a 1x4 int8 block),
// copied bit for bit; a pad is 4 zero bytes.
void build_panels_4byte(const char* what, const int32_t* row_ptr, int64_t n, const uint16_t* col_idx,
                        const unsigned char* values, int64_t k, int32_t* sub, uint16_t* idx, unsigned char* out_values,
                        int64_t entries) {
  check_panel_k(k);
  int64_t e = 0, s = 0;
  csr_panels_walk(
      row_ptr, n, col_idx, k, [&] { sub[s++] = static_cast<int32_t>(e); },
      [&](int64_t col, int64_t j) {
        if (e >= entries) throw std::invalid_argument(std::string(what) + ": more entries than allocated");
        idx[e] = static_cast<uint16_t>(col);
        if (j < 0) {
          std::memset(out_values + 4 * e, 0, 4);
        } else {
          std::memcpy(out_values + 4 * e, values + 4 * j, 4);
        }
        ++e;
      });
  if (e != entries) throw std::invalid_argument(std::string(what) + ": fewer entries than allocated");
  sub[s] = static_cast<int32_t>(e);
}

}  // namespace

void build_csr_panels(const int32_t* row_ptr, int64_t n, const uint16_t* col_idx, const float* values, int64_t k,
                      int32_t* sub, uint16_t* idx, float* out_values, int64_t entries) {
  build_panels_4byte("sparse csr panels", row_ptr, n, col_idx, reinterpret_cast<const unsigned char*>(values), k, sub,
                     idx, reinterpret_cast<unsigned char*>(out_values), entries);
}

int64_t bsr1x4_panel_entries(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, int64_t k) {
  check_k(k, "sparse bsr1x4 panels");
  return csr_panel_entries(row_ptr, n, blk_idx, (k + 3) / 4);
}

void build_bsr1x4_panels(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, const int8_t* values, int64_t k,
                         int32_t* sub, uint16_t* idx, int8_t* out_values, int64_t entries) {
  check_k(k, "sparse bsr1x4 panels");
  build_panels_4byte("sparse bsr1x4 panels", row_ptr, n, blk_idx, reinterpret_cast<const unsigned char*>(values),
                     (k + 3) / 4, sub, idx, reinterpret_cast<unsigned char*>(out_values), entries);
}

}  // namespace sparse
}  // namespace pycompress
