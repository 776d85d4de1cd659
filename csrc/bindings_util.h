// Helpers shared by the pybind11 binding files: the Python layer passes
// data_ptr()s as integers and activation codes as ints; plans report what
// their thread tuner learned.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/epilogue_math.h"
#include "common/thread_tuner.h"

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

// What a plan's ThreadTuner learned: team size, ns per call on one thread and
// on the team (0: not timed yet).
inline pybind11::dict tuning_dict(const ThreadTuner& t) {
  pybind11::dict d;
  d["team"] = t.team();
  d["one_thread_ns"] = t.estimate_ns(0);
  d["team_ns"] = t.estimate_ns(1);
  return d;
}

// Runs `f` (it returns an error message, empty on success) with the GIL released; a message is raised as
// E (std::invalid_argument: ValueError, std::runtime_error: RuntimeError) after `prefix`.
template <typename E = std::invalid_argument, typename F>
void run_released(F&& f, const std::string& prefix = "") {
  std::string err;
  {
    pybind11::gil_scoped_release release;
    err = f();
  }
  if (!err.empty()) throw E(prefix + err);
}

}  // namespace bindings
}  // namespace pycompress
