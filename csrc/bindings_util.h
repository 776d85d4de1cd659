// Helpers shared by the pybind11 binding files: the Python layer passes
// data_ptr()s as integers and activation codes as ints.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "common/epilogue_math.h"

namespace pycompress {
namespace bindings {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline Activation parse_activation(int act) {
  if (act < 0 || act > 2) throw std::invalid_argument("activation code must be 0 (none), 1 (relu) or 2 (gelu)");
  return static_cast<Activation>(act);
}

}  // namespace bindings
}  // namespace pycompress
