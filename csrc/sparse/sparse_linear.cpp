// Driver for the sparse linears: validates packs and sizes, quantizes (int8)
// and transposes the activations when the cols kernels run, splits the output
// channels across threads by nonzero count and runs the active ISA's kernels.
// Compiled without ISA flags.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "common/thread_tuner.h"
#include "q8/q8_gemm.h"
#include "sparse/sparse.h"

namespace pycompress {
namespace sparse {

const Kernels& kernels_for(Isa isa) {
  static const Kernels& (*const tables[kIsaCount])() = {
      &kernels_scalar, PYCOMPRESS_X86_TABLE(kernels_avx2), nullptr, PYCOMPRESS_X86_TABLE(kernels_avx512vnni),
      PYCOMPRESS_X86_TABLE(kernels_avx512vbmi)};
  return pick_kernels(isa, tables);
}

bool sliced_bytes_vectorized() {
  return kernels_for(active_isa()).q8_sliced_bytes != kernels_scalar().q8_sliced_bytes;
}

namespace {

// Below this many multiply-adds per thread a helper thread costs more than it
// saves (its wake-up is ~10-50 us in a VM).
constexpr int64_t kMinMacsPerThread = int64_t{1} << 17;
// Work of one output channel beyond its nonzeros (reduction, epilogue, store),
// in nonzero equivalents: keeps the split fair at very high sparsity.
constexpr int64_t kRowOverhead = 8;
// Chunks per thread: dynamic hand-out evens out the rest of the imbalance.
constexpr int64_t kChunksPerThread = 4;

std::string sizes(int64_t m, int64_t k, int64_t n) {
  return "M=" + std::to_string(m) + " K=" + std::to_string(k) + " N=" + std::to_string(n);
}

int effective_threads(int requested, int64_t work) { return threads_for_work(requested, work, kMinMacsPerThread); }

// Boundaries b[0] = 0 < ... < b[parts] = n of output channels so each part
// holds about the same nonzeros (row_ptr) plus a fixed per-channel cost.
// row_ptr == nullptr: every channel holds the same work (nm24).
std::vector<int64_t> split_by_nnz(const int32_t* row_ptr, int64_t n, int64_t parts) {
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
void transpose32(const uint32_t* src, int64_t rows, int64_t lds, uint32_t* dst, int64_t ld, int64_t c0, int64_t c1) {
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

std::vector<RowBlock> row_blocks(int64_t m, int64_t k_elems, int64_t block_rows, int64_t lanes = 16) {
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
void transpose_blocks(const uint32_t* src, int64_t lds, int64_t k_elems, const std::vector<RowBlock>& blocks,
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
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Transposed activations start on a cache line: every row vector the cols
// kernels load is then one whole line (a line-split zmm load costs twice as
// much and made the int8 cols kernel ~2x slower).
uint32_t* grow_aligned(std::vector<uint32_t>& v, size_t n) {
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
Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

void check_k(int64_t k, const char* what) {
  if (k < 1 || k > kMaxK) {
    throw std::invalid_argument(std::string(what) + ": K=" + std::to_string(k) + " is outside [1, " +
                                std::to_string(kMaxK) +
                                "]: uint16 column indices (and, for int8, the int32 accumulator) cover at most " +
                                std::to_string(kMaxK) + " input features; split the layer along K");
  }
}

}  // namespace

void validate_csr(const int32_t* row_ptr, int64_t n, const uint16_t* col_idx, int64_t nnz, int64_t k) {
  check_k(k, "sparse csr");
  if (n < 1) throw std::invalid_argument("sparse csr: N=" + std::to_string(n) + " must be >= 1");
  if (row_ptr[0] != 0) throw std::invalid_argument("sparse csr: row_ptr[0] = " + std::to_string(row_ptr[0]) + ", expected 0");
  for (int64_t i = 0; i < n; ++i) {
    if (row_ptr[i + 1] < row_ptr[i]) {
      throw std::invalid_argument("sparse csr: row_ptr decreases at row " + std::to_string(i) + " (" +
                                  std::to_string(row_ptr[i]) + " -> " + std::to_string(row_ptr[i + 1]) + ")");
    }
  }
  if (row_ptr[n] != nnz) {
    throw std::invalid_argument("sparse csr: row_ptr[N] = " + std::to_string(row_ptr[n]) + " but " +
                                std::to_string(nnz) + " indices/values are stored");
  }
  uint16_t max_idx = 0;
  for (int64_t j = 0; j < nnz; ++j) max_idx = std::max(max_idx, col_idx[j]);
  if (nnz > 0 && max_idx >= k) {
    throw std::invalid_argument("sparse csr: column index " + std::to_string(max_idx) + " out of range for K=" +
                                std::to_string(k));
  }
}

void validate_bsr1x4(const int32_t* row_ptr, int64_t n, const uint16_t* blk_idx, int64_t nblocks, int64_t k) {
  check_k(k, "sparse bsr1x4");
  const int64_t groups = (k + 3) / 4;
  try {
    validate_csr(row_ptr, n, blk_idx, nblocks, groups);
  } catch (const std::invalid_argument& e) {
    // Same structure with k/4 group indices: restate the error for this format.
    std::string msg = e.what();
    const std::string prefix = "sparse csr";
    if (msg.compare(0, prefix.size(), prefix) == 0) msg = "sparse bsr1x4 (indices are k/4 groups)" + msg.substr(prefix.size());
    throw std::invalid_argument(msg);
  }
}

void validate_sliced(const int32_t* slice_ptr, int64_t n, const uint16_t* step_base, int64_t nsteps, int64_t k,
                     bool bytes) {
  check_k(k, "sparse sliced");
  if (n < 1) throw std::invalid_argument("sparse sliced: N=" + std::to_string(n) + " must be >= 1");
  const int64_t slices = (n + kSliceLanes - 1) / kSliceLanes;
  if (slice_ptr[0] != 0) throw std::invalid_argument("sparse sliced: slice_ptr[0] = " + std::to_string(slice_ptr[0]) + ", expected 0");
  for (int64_t s = 0; s < slices; ++s) {
    if (slice_ptr[s + 1] < slice_ptr[s]) {
      throw std::invalid_argument("sparse sliced: slice_ptr decreases at slice " + std::to_string(s));
    }
  }
  if (slice_ptr[slices] != nsteps) {
    throw std::invalid_argument("sparse sliced: slice_ptr[end] = " + std::to_string(slice_ptr[slices]) + " but " +
                                std::to_string(nsteps) + " steps are stored");
  }
  const int64_t last_base = bytes ? sliced_row_bytes(k) - kSliceWindowBytes : sliced_row_bytes(k) / 4 - kSliceWindowGroups;
  for (int64_t j = 0; j < nsteps; ++j) {
    if (step_base[j] > last_base) {
      throw std::invalid_argument("sparse sliced: step " + std::to_string(j) + " window starts at " +
                                  (bytes ? "byte " : "group ") +
                                  std::to_string(step_base[j]) + ", beyond " + std::to_string(last_base) +
                                  " for K=" + std::to_string(k));
    }
  }
}

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

void check_panel_k(int64_t k) {
  if (k < 1 || k > kPanelMaxK) {
    throw std::invalid_argument("sparse csr panels: K=" + std::to_string(k) + " is outside [1, " +
                                std::to_string(kPanelMaxK) + "] (the pad index K must fit uint16)");
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

void validate_bsr1x4_panels(const int32_t* sub, int64_t nsub, const uint16_t* idx, int64_t entries, int64_t n,
                            int64_t k) {
  check_k(k, "sparse bsr1x4 panels");
  try {
    validate_csr_panels(sub, nsub, idx, entries, n, (k + 3) / 4);
  } catch (const std::invalid_argument& e) {
    std::string msg = e.what();
    const std::string prefix = "sparse csr panels";
    if (msg.compare(0, prefix.size(), prefix) == 0) {
      msg = "sparse bsr1x4 panels (indices are k/4 groups, K is their count)" + msg.substr(prefix.size());
    }
    throw std::invalid_argument(msg);
  }
}

void validate_csr_panels(const int32_t* sub, int64_t nsub, const uint16_t* idx, int64_t entries, int64_t n, int64_t k) {
  check_panel_k(k);
  if (n < 1) throw std::invalid_argument("sparse csr panels: N=" + std::to_string(n) + " must be >= 1");
  const int64_t expected = n * csr_panels_count(k) + 1;
  if (nsub != expected) {
    throw std::invalid_argument("sparse csr panels: " + std::to_string(nsub) + " segment pointers, expected " +
                                std::to_string(expected) + " for N=" + std::to_string(n) + " K=" + std::to_string(k));
  }
  if (sub[0] != 0) throw std::invalid_argument("sparse csr panels: sub[0] = " + std::to_string(sub[0]) + ", expected 0");
  for (int64_t i = 0; i + 1 < nsub; ++i) {
    if (sub[i + 1] < sub[i]) throw std::invalid_argument("sparse csr panels: pointers decrease at " + std::to_string(i));
    if (sub[i] % 4 != 0) {
      throw std::invalid_argument("sparse csr panels: segment " + std::to_string(i) +
                                  " starts at " + std::to_string(sub[i]) + ", not a multiple of 4");
    }
  }
  if (sub[nsub - 1] != entries || entries % 4 != 0) {
    throw std::invalid_argument("sparse csr panels: sub[end] = " + std::to_string(sub[nsub - 1]) + " but " +
                                std::to_string(entries) + " entries are stored (a multiple of 4 expected)");
  }
  uint16_t max_idx = 0;
  for (int64_t j = 0; j < entries; ++j) max_idx = std::max(max_idx, idx[j]);
  if (entries > 0 && max_idx > k) {
    throw std::invalid_argument("sparse csr panels: index " + std::to_string(max_idx) + " beyond the pad row K=" +
                                std::to_string(k));
  }
}

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
