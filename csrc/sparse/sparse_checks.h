// Argument checks shared by the sparse validators, layout builders and
// drivers (internal: not part of the kernels' contract in sparse.h).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "sparse/sparse.h"

namespace pycompress {
namespace sparse {
namespace internal {

inline std::string sizes(int64_t m, int64_t k, int64_t n) {
  return "M=" + std::to_string(m) + " K=" + std::to_string(k) + " N=" + std::to_string(n);
}

inline void check_k(int64_t k, const char* what) {
  if (k < 1 || k > kMaxK) {
    throw std::invalid_argument(std::string(what) + ": K=" + std::to_string(k) + " is outside [1, " +
                                std::to_string(kMaxK) +
                                "]: uint16 column indices (and, for int8, the int32 accumulator) cover at most " +
                                std::to_string(kMaxK) + " input features; split the layer along K");
  }
}

inline void check_panel_k(int64_t k) {
  if (k < 1 || k > kPanelMaxK) {
    throw std::invalid_argument("sparse csr panels: K=" + std::to_string(k) + " is outside [1, " +
                                std::to_string(kPanelMaxK) + "] (the pad index K must fit uint16)");
  }
}

}  // namespace internal
}  // namespace sparse
}  // namespace pycompress
