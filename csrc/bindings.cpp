// pybind11 bindings. The kernels take raw pointers and sizes: the Python layer
// (pycompress/ops.py) owns torch, checks dtypes, shapes and contiguity, and
// passes data_ptr()s. Every kernel entry drops the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings_util.h"
#include "common/isa.h"
#include "common/thread_pool.h"
#include "q8/q8_gemm.h"

namespace py = pybind11;
using namespace pycompress;
using bindings::parse_activation;
using bindings::ptr;

void register_sparse_bindings(py::module_& m);   // csrc/sparse/sparse_bindings.cpp
void register_entropy_bindings(py::module_& m);  // csrc/entropy/entropy_bindings.cpp
void register_attention_bindings(py::module_& m);  // csrc/attention/attention_bindings.cpp

namespace {

std::vector<std::string> isa_names(const std::vector<Isa>& isas) {
  std::vector<std::string> names;
  for (Isa isa : isas) names.emplace_back(isa_name(isa));
  return names;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pycompress native kernels (torch-free; see pycompress.ops for the torch ops)";

  m.def("build_info", [] {
    py::dict d;
    d["version"] = PYCOMPRESS_VERSION;
    d["compiled_isas"] = isa_names(compiled_isas());
    d["supported_isas"] = isa_names(supported_isas());
    d["active_isa"] = std::string(isa_name(active_isa()));
    d["pool_workers"] = thread_pool_workers();
    d["threading"] = std::string(threading_backend());
    return d;
  });
  m.def("set_isa", [](const std::string& name) { set_active_isa(parse_isa(name)); }, py::arg("name"));
  m.def("get_isa", [] { return std::string(isa_name(active_isa())); });

  m.def(
      "q8_linear",
      [](std::uintptr_t x, int64_t m, int64_t k, int64_t ldx, std::uintptr_t w_packed, std::uintptr_t col_sum,
         std::uintptr_t w_scale, std::uintptr_t bias, int64_t n, std::uintptr_t y, int64_t ldy, int act,
         bool is_static, float static_scale, int32_t static_zp, int nthreads) {
        q8::LinearArgs a{ptr<const float>(x), m, k, ldx, ptr<const int8_t>(w_packed), ptr<const int32_t>(col_sum),
                         ptr<const float>(w_scale), ptr<const float>(bias), n, ptr<float>(y), ldy,
                         parse_activation(act), is_static, static_scale, static_zp, nthreads};
        py::gil_scoped_release release;
        q8::linear(a);
      },
      "y[m, n] = act(dequant(quant(x) @ W^T) + bias) on the active ISA");

  m.def(
      "q8_quantize_rows",
      [](std::uintptr_t x, int64_t m, int64_t k, int64_t ldx, std::uintptr_t q, std::uintptr_t scale,
         std::uintptr_t zp, std::uintptr_t nonfinite, bool is_static, float static_scale, int32_t static_zp) {
        py::gil_scoped_release release;
        q8::quantize_rows(ptr<const float>(x), m, k, ldx, ptr<uint8_t>(q), ptr<float>(scale), ptr<int32_t>(zp),
                          ptr<uint8_t>(nonfinite), is_static, static_scale, static_zp);
      },
      "test hook: the activation quantization stage alone");

  m.def(
      "q8_gemm_raw",
      [](std::uintptr_t q, int64_t m, int64_t kp, std::uintptr_t w_packed, int64_t n, std::uintptr_t out,
         int nthreads) {
        py::gil_scoped_release release;
        q8::gemm_raw(ptr<const uint8_t>(q), m, kp, ptr<const int8_t>(w_packed), n, ptr<int32_t>(out), nthreads);
      },
      "test hook: raw int32 accumulators of quantized rows against packed weights");

  register_sparse_bindings(m);
  register_entropy_bindings(m);
  register_attention_bindings(m);
}
