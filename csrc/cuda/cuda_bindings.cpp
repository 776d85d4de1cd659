// pybind11 module _C_cuda: the CUDA kernels, built only with PYCOMPRESS_CUDA=ON.
// Pointers in (torch's device memory and current stream, from pycompress/ops);
// the GIL is released around every launch. Linked to the static CUDA runtime, so
// importing it needs no CUDA install; without a driver or device,
// device_status() says why and nothing is launched.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings_util.h"
#include "cuda/q8_cuda.h"

namespace py = pybind11;
using namespace pycompress;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pycompress CUDA kernels (int8 linear on tensor cores)";
  m.def("archs", [] { return std::string(PYCOMPRESS_CUDA_ARCHS); }, "the CUDA architectures this module was built for, comma-separated");
  m.def(
      "device_status",
      [] {
        const auto s = q8cuda::device_status();
        py::dict d;
        d["count"] = s.count;
        d["reason"] = s.reason;
        py::list devices;
        for (int i = 0; i < s.count; ++i) {
          int major = 0, minor = 0;
          const std::string name = q8cuda::device_name(i, &major, &minor);
          devices.append(py::make_tuple(name, major, minor));
        }
        d["devices"] = devices;
        return d;
      },
      "the CUDA devices visible to this module (count -1 and the reason when the runtime cannot start)");
  m.def("q8_scratch_bytes", &q8cuda::scratch_bytes, py::arg("m"), py::arg("n"), py::arg("k"), py::arg("sms"),
        py::arg("wgmma"));
  m.def(
      "q8_linear",
      [](std::uintptr_t x, int dtype, int64_t rows, int64_t k, int64_t ldx, std::uintptr_t w, std::uintptr_t col_sum,
         std::uintptr_t w_scale, std::uintptr_t bias, int64_t n, std::uintptr_t y, int64_t ldy, int act, bool is_static,
         float static_scale, int32_t static_zp, int32_t qmax, std::uintptr_t scratch, int64_t scratch_size,
         std::uintptr_t raw, std::uintptr_t stream, int64_t sms, bool wgmma) {
        if (dtype < 0 || dtype > 2) throw std::invalid_argument("q8_linear: dtype code must be 0, 1 or 2");
        q8cuda::LinearArgs a{reinterpret_cast<const void*>(x), static_cast<q8cuda::DType>(dtype), rows, k, ldx,
                             reinterpret_cast<const int8_t*>(w), reinterpret_cast<const int32_t*>(col_sum),
                             reinterpret_cast<const float*>(w_scale), reinterpret_cast<const float*>(bias), n,
                             reinterpret_cast<void*>(y), ldy, act, is_static, static_scale, static_zp, qmax,
                             reinterpret_cast<void*>(scratch), scratch_size, reinterpret_cast<int32_t*>(raw), stream};
        a.sms = sms;
        a.wgmma = wgmma;
        bindings::run_released<std::runtime_error>([&] { return q8cuda::linear(a); }, "int8_linear (CUDA): ");
      },
      "y[m, n] = the int8 linear of x on the given stream (raw != 0: int32 accumulators into raw instead)");
  m.def(
      "q4_linear",
      [](std::uintptr_t x, int dtype, int64_t rows, int64_t k, int64_t ldx, std::uintptr_t w4, std::uintptr_t g_scale,
         std::uintptr_t corr, int64_t groups, std::uintptr_t bias, int64_t n, std::uintptr_t y, int64_t ldy, int act,
         bool is_static, float static_scale, int32_t static_zp, int32_t qmax, std::uintptr_t scratch,
         int64_t scratch_size, std::uintptr_t stream) {
        if (dtype < 0 || dtype > 2) throw std::invalid_argument("q4_linear: dtype code must be 0, 1 or 2");
        q8cuda::LinearArgs a{reinterpret_cast<const void*>(x), static_cast<q8cuda::DType>(dtype), rows, k, ldx,
                             nullptr, nullptr, nullptr, reinterpret_cast<const float*>(bias), n,
                             reinterpret_cast<void*>(y), ldy, act, is_static, static_scale, static_zp, qmax,
                             reinterpret_cast<void*>(scratch), scratch_size, nullptr, stream};
        a.w4 = reinterpret_cast<const uint8_t*>(w4);
        a.g_scale = reinterpret_cast<const float*>(g_scale);
        a.corr = reinterpret_cast<const float*>(corr);
        a.groups = groups;
        bindings::run_released<std::runtime_error>([&] { return q8cuda::q4_linear(a); }, "int4_linear (CUDA): ");
      },
      "y[m, n] = the W4A8 linear of x over the CPU's 4-bit pack (validated by the caller), on the given stream");
  m.def(
      "q8_nm24_linear",
      [](std::uintptr_t x, int dtype, int64_t rows, int64_t k, int64_t ldx, std::uintptr_t pack,
         std::uintptr_t col_sum, std::uintptr_t w_scale, std::uintptr_t bias, int64_t n, std::uintptr_t y, int64_t ldy,
         int act, bool is_static, float static_scale, int32_t static_zp, int32_t qmax, std::uintptr_t scratch,
         int64_t scratch_size, std::uintptr_t raw, std::uintptr_t stream) {
        if (dtype < 0 || dtype > 2) throw std::invalid_argument("q8_nm24_linear: dtype code must be 0, 1 or 2");
        q8cuda::LinearArgs a{reinterpret_cast<const void*>(x), static_cast<q8cuda::DType>(dtype), rows, k, ldx,
                             nullptr, reinterpret_cast<const int32_t*>(col_sum),
                             reinterpret_cast<const float*>(w_scale), reinterpret_cast<const float*>(bias), n,
                             reinterpret_cast<void*>(y), ldy, act, is_static, static_scale, static_zp, qmax,
                             reinterpret_cast<void*>(scratch), scratch_size, reinterpret_cast<int32_t*>(raw), stream};
        a.nm24 = reinterpret_cast<const void*>(pack);
        bindings::run_released<std::runtime_error>([&] { return q8cuda::nm24_linear(a); },
                                                   "int8_linear (CUDA, 2:4 weights): ");
      },
      "y[m, n] = the int8 linear of x over the 2:4 GPU pack of its weights (cuda_nm24_pack), on the given stream");
  m.def(
      "q8_sparse_linear",
      [](std::uintptr_t x, int dtype, int64_t rows, int64_t k, int64_t ldx, std::uintptr_t row_ptr,
         std::uintptr_t blk_idx, std::uintptr_t values, std::uintptr_t col_sum, std::uintptr_t w_scale,
         std::uintptr_t bias, int64_t n, std::uintptr_t y, int64_t ldy, int act, bool is_static, float static_scale,
         int32_t static_zp, int32_t qmax, std::uintptr_t scratch, int64_t scratch_size, std::uintptr_t raw,
         std::uintptr_t stream, std::uintptr_t row_order) {
        if (dtype < 0 || dtype > 2) throw std::invalid_argument("q8_sparse_linear: dtype code must be 0, 1 or 2");
        q8cuda::LinearArgs a{reinterpret_cast<const void*>(x), static_cast<q8cuda::DType>(dtype), rows, k, ldx,
                             nullptr, reinterpret_cast<const int32_t*>(col_sum),
                             reinterpret_cast<const float*>(w_scale), reinterpret_cast<const float*>(bias), n,
                             reinterpret_cast<void*>(y), ldy, act, is_static, static_scale, static_zp, qmax,
                             reinterpret_cast<void*>(scratch), scratch_size, reinterpret_cast<int32_t*>(raw), stream,
                             reinterpret_cast<const int32_t*>(row_ptr), reinterpret_cast<const uint16_t*>(blk_idx),
                             reinterpret_cast<const int8_t*>(values)};
        a.row_order = reinterpret_cast<const int32_t*>(row_order);
        bindings::run_released<std::runtime_error>([&] { return q8cuda::sparse_linear(a); },
                                                   "sparse_int8_linear (CUDA): ");
      },
      "y[m, n] = the int8 linear of x over bsr1x4 sparse weights (validated by the caller), on the given stream");
  // The float sparse linears: csr (row_ptr, col_idx, row order) or nm24 (nm_idx, its words a channel).
  auto f32_sparse = [](const char* op, std::uintptr_t x, int dtype, int64_t rows, int64_t k, int64_t ldx,
                       std::uintptr_t values, std::uintptr_t bias, int64_t n, std::uintptr_t y, int64_t ldy, int act,
                       std::uintptr_t stream, q8cuda::LinearArgs a) {
    if (dtype < 0 || dtype > 2) throw std::invalid_argument(std::string(op) + ": dtype code must be 0, 1 or 2");
    a.x = reinterpret_cast<const void*>(x);
    a.dtype = static_cast<q8cuda::DType>(dtype);
    a.m = rows;
    a.k = k;
    a.ldx = ldx;
    a.bias = reinterpret_cast<const float*>(bias);
    a.n = n;
    a.y = reinterpret_cast<void*>(y);
    a.ldy = ldy;
    a.act = act;
    a.stream = stream;
    a.f32_values = reinterpret_cast<const float*>(values);
    bindings::run_released<std::runtime_error>([&] { return q8cuda::sparse_f32_linear(a); },
                                               std::string(op) + " (CUDA): ");
  };
  m.def(
      "f32_sparse_linear",
      [f32_sparse](std::uintptr_t x, int dtype, int64_t rows, int64_t k, int64_t ldx, std::uintptr_t row_ptr,
                   std::uintptr_t col_idx, std::uintptr_t values, std::uintptr_t bias, int64_t n, std::uintptr_t y,
                   int64_t ldy, int act, std::uintptr_t stream, std::uintptr_t row_order) {
        q8cuda::LinearArgs a{};
        a.row_ptr = reinterpret_cast<const int32_t*>(row_ptr);
        a.blk_idx = reinterpret_cast<const uint16_t*>(col_idx);
        a.row_order = reinterpret_cast<const int32_t*>(row_order);
        f32_sparse("sparse_linear_csr", x, dtype, rows, k, ldx, values, bias, n, y, ldy, act, stream, a);
      },
      "y[m, n] = act(x @ W^T + b) over csr float weights (validated by the caller), on the given stream");
  m.def(
      "f32_nm24_linear",
      [f32_sparse](std::uintptr_t x, int dtype, int64_t rows, int64_t k, int64_t ldx, std::uintptr_t nm_idx,
                   int64_t words, std::uintptr_t values, std::uintptr_t bias, int64_t n, std::uintptr_t y, int64_t ldy,
                   int act, std::uintptr_t stream) {
        q8cuda::LinearArgs a{};
        a.nm_idx = reinterpret_cast<const uint32_t*>(nm_idx);
        a.nm_words = words;
        f32_sparse("sparse_linear_nm24", x, dtype, rows, k, ldx, values, bias, n, y, ldy, act, stream, a);
      },
      "y[m, n] = act(x @ W^T + b) over 2:4 float weights (the CPU's nm24 pack, shapes checked by the caller), on "
      "the given stream");
}
