// Validation of every sparse pack and derived layout (sparse.h states the
// invariants): run before any kernel reads a pack, also on load. Compiled
// without ISA flags.
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

}  // namespace sparse
}  // namespace pycompress
