// pybind11 bindings of the sparse linears. Raw pointers and sizes only: the
// Python layer (pycompress/ops/sparse.py) checks dtypes, shapes, contiguity and
// runs the structural validation before any kernel call. Kernels drop the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "bindings_util.h"
#include "sparse/sparse.h"

namespace py = pybind11;
using namespace pycompress;
using bindings::ptr;
using bindings::tuning_dict;

namespace {

sparse::Format f32_format(int code) {
  if (code != static_cast<int>(sparse::Format::Csr) && code != static_cast<int>(sparse::Format::Nm24)) {
    throw std::invalid_argument("sparse fp32 format code must be 0 (csr) or 1 (nm24)");
  }
  return static_cast<sparse::Format>(code);
}

sparse::Q8Weights q8_weights(int64_t n, int64_t k, std::uintptr_t row_ptr, std::uintptr_t blk_idx,
                             std::uintptr_t values, std::uintptr_t col_sum, std::uintptr_t w_scale) {
  return sparse::Q8Weights{n, k, (k + 3) / 4 * 4, ptr<const int32_t>(row_ptr), ptr<const uint16_t>(blk_idx),
                           ptr<const int8_t>(values), ptr<const int32_t>(col_sum), ptr<const float>(w_scale)};
}

// step_lane: uint32 [steps][2] nibbles of the group layout, or (bytes) uint8 [steps][64] positions.
sparse::SlicedWeights sliced_weights(int64_t n, int64_t k, std::uintptr_t slice_ptr, std::uintptr_t step_base,
                                     std::uintptr_t step_lane, bool bytes, std::uintptr_t values,
                                     std::uintptr_t col_sum, std::uintptr_t w_scale) {
  return sparse::SlicedWeights{n, k, ptr<const int32_t>(slice_ptr), ptr<const uint16_t>(step_base),
                               bytes ? nullptr : ptr<const uint32_t>(step_lane),
                               bytes ? ptr<const uint8_t>(step_lane) : nullptr, ptr<const int8_t>(values),
                               ptr<const int32_t>(col_sum), ptr<const float>(w_scale)};
}

// The activation side of an int8 sparse call, as both int8 linears' bindings receive it.
void set_q8_call(sparse::Q8Call& c, std::uintptr_t x, int64_t m, int64_t ldx, std::uintptr_t bias, int act,
                 bool is_static, float static_scale, int32_t static_zp, std::uintptr_t y, int64_t ldy, int nthreads) {
  c.x = ptr<const float>(x);
  c.m = m;
  c.ldx = ldx;
  c.bias = ptr<const float>(bias);
  c.act = bindings::parse_activation(act);
  c.is_static = is_static;
  c.static_scale = static_scale;
  c.static_zp = static_zp;
  c.y = ptr<float>(y);
  c.ldy = ldy;
  c.nthreads = nthreads;
}

// One sliced int8 linear (either layout) with its weight-side operands bound
// once: SparseInt8Linear keeps one per layout and rebuilds it whenever the pack,
// a derived layout or a weight-side buffer changes (pycompress/ops/sparse.py
// sliced_linear_plan validates the layout first), so an eager call passes
// only x, y and the thread count.
class SlicedLinearPlan {
 public:
  SlicedLinearPlan(int64_t n, int64_t k, std::uintptr_t slice_ptr, std::uintptr_t step_base, std::uintptr_t step_lane,
                   bool bytes, std::uintptr_t values, std::uintptr_t col_sum, std::uintptr_t w_scale,
                   std::uintptr_t bias, int act, bool is_static, float static_scale, int32_t static_zp) {
    args_.w = sliced_weights(n, k, slice_ptr, step_base, step_lane, bytes, values, col_sum, w_scale);
    set_q8_call(args_, 0, 0, k, bias, act, is_static, static_scale, static_zp, 0, n, 1);
  }

  // y[m, n] (contiguous) for x's m rows (row stride ldx).
  void run(std::uintptr_t x, int64_t m, int64_t ldx, std::uintptr_t y, int nthreads) const {
    sparse::SlicedLinearArgs a = args_;
    a.x = ptr<const float>(x);
    a.m = m;
    a.ldx = ldx;
    a.y = ptr<float>(y);
    a.nthreads = nthreads;
    a.tuner = &tuner_;
    py::gil_scoped_release release;
    sparse::sliced_linear(a);
  }

  const ThreadTuner& tuner() const { return tuner_; }

 private:
  sparse::SlicedLinearArgs args_{};
  mutable ThreadTuner tuner_;  // this layer's small calls learn their thread count
};

}  // namespace

void register_sparse_bindings(py::module_& m) {
  py::class_<SlicedLinearPlan>(m, "SlicedLinearPlan")
      .def(py::init<int64_t, int64_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, bool, std::uintptr_t,
                    std::uintptr_t, std::uintptr_t, std::uintptr_t, int, bool, float, int32_t>())
      .def("run", &SlicedLinearPlan::run, "y[m, n] = the bound sliced int8 linear of x (m rows, row stride ldx)")
      .def("thread_tuning", [](const SlicedLinearPlan& p) { return tuning_dict(p.tuner()); },
           "what this layer's small calls learned: team size and ns per call on one thread and on the team");
  // The csr panel layout's geometry (sparse.h), for the Python builder and the tests.
  m.attr("SPARSE_PANEL_ROWS") = sparse::kPanelRows;
  m.attr("SPARSE_PANEL_COLS") = sparse::kPanelCols;
  m.attr("SPARSE_PANEL_MAX_K") = sparse::kPanelMaxK;
  m.def(
      "sparse_validate_csr",
      [](std::uintptr_t row_ptr, int64_t n, std::uintptr_t col_idx, int64_t nnz, int64_t k) {
        py::gil_scoped_release release;
        sparse::validate_csr(ptr<const int32_t>(row_ptr), n, ptr<const uint16_t>(col_idx), nnz, k);
      },
      "checks a csr pack: row_ptr[0] == 0, monotonic, row_ptr[N] == nnz, every index < K");
  m.def(
      "sparse_validate_bsr1x4",
      [](std::uintptr_t row_ptr, int64_t n, std::uintptr_t blk_idx, int64_t nblocks, int64_t k) {
        py::gil_scoped_release release;
        sparse::validate_bsr1x4(ptr<const int32_t>(row_ptr), n, ptr<const uint16_t>(blk_idx), nblocks, k);
      },
      "checks a bsr1x4 pack: as csr, with block indices < ceil(K/4)");
  m.def(
      "sparse_f32_linear",
      [](int format, int64_t n, int64_t k, std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t nm_idx,
         int64_t nm_words, std::uintptr_t values, std::uintptr_t x, int64_t m, int64_t ldx, std::uintptr_t bias,
         int act, std::uintptr_t y, int64_t ldy, int nthreads, std::uintptr_t panel_sub, std::uintptr_t panel_idx,
         std::uintptr_t panel_values) {
        sparse::F32LinearArgs a{};
        a.w = sparse::F32Weights{f32_format(format), n, k, ptr<const int32_t>(row_ptr), ptr<const uint16_t>(col_idx),
                                 ptr<const uint32_t>(nm_idx), nm_words, ptr<const float>(values)};
        const sparse::CsrPanels panels{ptr<const int32_t>(panel_sub), ptr<const uint16_t>(panel_idx),
                                       ptr<const float>(panel_values)};
        if (panel_sub != 0) a.w.panels = &panels;
        a.x = ptr<const float>(x);
        a.m = m;
        a.ldx = ldx;
        a.bias = ptr<const float>(bias);
        a.act = bindings::parse_activation(act);
        a.y = ptr<float>(y);
        a.ldy = ldy;
        a.nthreads = nthreads;
        py::gil_scoped_release release;
        sparse::f32_linear(a);
      },
      "y = act(x @ W^T + bias) with a validated csr / nm24 fp32 pack (and, optionally, its validated csr panel "
      "layout for M >= 4), on the active ISA",
      py::arg("format"), py::arg("n"), py::arg("k"), py::arg("row_ptr"), py::arg("col_idx"), py::arg("nm_idx"),
      py::arg("nm_words"), py::arg("values"), py::arg("x"), py::arg("m"), py::arg("ldx"), py::arg("bias"),
      py::arg("act"), py::arg("y"), py::arg("ldy"), py::arg("nthreads"), py::arg("panel_sub") = 0,
      py::arg("panel_idx") = 0, py::arg("panel_values") = 0);
  m.def(
      "sparse_csr_panel_entries",
      [](std::uintptr_t row_ptr, int64_t n, std::uintptr_t col_idx, int64_t k) {
        py::gil_scoped_release release;
        return sparse::csr_panel_entries(ptr<const int32_t>(row_ptr), n, ptr<const uint16_t>(col_idx), k);
      },
      "number of entries (nonzeros + pads) of the csr panel layout of a validated csr pack");
  m.def(
      "sparse_build_csr_panels",
      [](std::uintptr_t row_ptr, int64_t n, std::uintptr_t col_idx, std::uintptr_t values, int64_t k,
         std::uintptr_t sub, std::uintptr_t idx, std::uintptr_t out_values, int64_t entries) {
        py::gil_scoped_release release;
        sparse::build_csr_panels(ptr<const int32_t>(row_ptr), n, ptr<const uint16_t>(col_idx), ptr<const float>(values),
                                 k, ptr<int32_t>(sub), ptr<uint16_t>(idx), ptr<float>(out_values), entries);
      },
      "fills a csr panel layout (sized by sparse_csr_panel_entries) from a validated csr pack");
  m.def(
      "sparse_validate_csr_panels",
      [](std::uintptr_t sub, int64_t nsub, std::uintptr_t idx, int64_t entries, int64_t n, int64_t k) {
        py::gil_scoped_release release;
        sparse::validate_csr_panels(ptr<const int32_t>(sub), nsub, ptr<const uint16_t>(idx), entries, n, k);
      },
      "checks a csr panel layout: pointer count, monotonic, segments on multiples of 4, every index <= K");
  m.def(
      "sparse_q8_linear",
      [](int64_t n, int64_t k, std::uintptr_t row_ptr, std::uintptr_t blk_idx, std::uintptr_t values,
         std::uintptr_t col_sum, std::uintptr_t w_scale, std::uintptr_t x, int64_t m, int64_t ldx, std::uintptr_t bias,
         int act, bool is_static, float static_scale, int32_t static_zp, std::uintptr_t y, int64_t ldy, int nthreads,
         std::uintptr_t panel_sub, std::uintptr_t panel_idx, std::uintptr_t panel_values) {
        sparse::Q8LinearArgs a{};
        a.w = q8_weights(n, k, row_ptr, blk_idx, values, col_sum, w_scale);
        const sparse::Bsr1x4Panels panels{ptr<const int32_t>(panel_sub), ptr<const uint16_t>(panel_idx),
                                          ptr<const int8_t>(panel_values)};
        if (panel_sub != 0) a.w.panels = &panels;
        set_q8_call(a, x, m, ldx, bias, act, is_static, static_scale, static_zp, y, ldy, nthreads);
        py::gil_scoped_release release;
        sparse::q8_linear(a);
      },
      "y = act(dequant(quant(x) @ W^T) + bias) with a validated bsr1x4 int8 pack (and, optionally, its validated "
      "bsr1x4 panel layout for M >= 4), on the active ISA",
      py::arg("n"), py::arg("k"), py::arg("row_ptr"), py::arg("blk_idx"), py::arg("values"), py::arg("col_sum"),
      py::arg("w_scale"), py::arg("x"), py::arg("m"), py::arg("ldx"), py::arg("bias"), py::arg("act"),
      py::arg("is_static"), py::arg("static_scale"), py::arg("static_zp"), py::arg("y"), py::arg("ldy"),
      py::arg("nthreads"), py::arg("panel_sub") = 0, py::arg("panel_idx") = 0, py::arg("panel_values") = 0);
  m.def(
      "sparse_bsr1x4_panel_entries",
      [](std::uintptr_t row_ptr, int64_t n, std::uintptr_t blk_idx, int64_t k) {
        py::gil_scoped_release release;
        return sparse::bsr1x4_panel_entries(ptr<const int32_t>(row_ptr), n, ptr<const uint16_t>(blk_idx), k);
      },
      "number of entries (blocks + pads) of the bsr1x4 panel layout of a validated bsr1x4 pack");
  m.def(
      "sparse_build_bsr1x4_panels",
      [](std::uintptr_t row_ptr, int64_t n, std::uintptr_t blk_idx, std::uintptr_t values, int64_t k,
         std::uintptr_t sub, std::uintptr_t idx, std::uintptr_t out_values, int64_t entries) {
        py::gil_scoped_release release;
        sparse::build_bsr1x4_panels(ptr<const int32_t>(row_ptr), n, ptr<const uint16_t>(blk_idx),
                                    ptr<const int8_t>(values), k, ptr<int32_t>(sub), ptr<uint16_t>(idx),
                                    ptr<int8_t>(out_values), entries);
      },
      "fills a bsr1x4 panel layout (sized by sparse_bsr1x4_panel_entries) from a validated bsr1x4 pack");
  m.def(
      "sparse_validate_bsr1x4_panels",
      [](std::uintptr_t sub, int64_t nsub, std::uintptr_t idx, int64_t entries, int64_t n, int64_t k) {
        py::gil_scoped_release release;
        sparse::validate_bsr1x4_panels(ptr<const int32_t>(sub), nsub, ptr<const uint16_t>(idx), entries, n, k);
      },
      "checks a bsr1x4 panel layout: as the csr one, with group indices <= ceil(K/4) (the pad)");
  m.def(
      "sparse_q8_accumulate_raw",
      [](int64_t n, int64_t k, std::uintptr_t row_ptr, std::uintptr_t blk_idx, std::uintptr_t values,
         std::uintptr_t q, int64_t m, std::uintptr_t out, int nthreads, std::uintptr_t panel_sub,
         std::uintptr_t panel_idx, std::uintptr_t panel_values) {
        sparse::Q8Weights w = q8_weights(n, k, row_ptr, blk_idx, values, 0, 0);
        const sparse::Bsr1x4Panels panels{ptr<const int32_t>(panel_sub), ptr<const uint16_t>(panel_idx),
                                          ptr<const int8_t>(panel_values)};
        if (panel_sub != 0) w.panels = &panels;
        py::gil_scoped_release release;
        sparse::q8_accumulate_raw(w, ptr<const uint8_t>(q), m, ptr<int32_t>(out), nthreads);
      },
      "test hook: raw int32 accumulators of quantized rows [m][round_up(K,4)] against a bsr1x4 pack (and its "
      "optional panel layout)",
      py::arg("n"), py::arg("k"), py::arg("row_ptr"), py::arg("blk_idx"), py::arg("values"), py::arg("q"),
      py::arg("m"), py::arg("out"), py::arg("nthreads"), py::arg("panel_sub") = 0, py::arg("panel_idx") = 0,
      py::arg("panel_values") = 0);
  m.def(
      "sparse_validate_sliced",
      [](std::uintptr_t slice_ptr, int64_t n, std::uintptr_t step_base, int64_t nsteps, int64_t k, bool bytes) {
        py::gil_scoped_release release;
        sparse::validate_sliced(ptr<const int32_t>(slice_ptr), n, ptr<const uint16_t>(step_base), nsteps, k, bytes);
      },
      "checks a sliced pack (bytes: the byte layout): slice_ptr[0] == 0, monotonic, slice_ptr[end] == nsteps, every "
      "window inside the row");
  m.def("sparse_sliced_bytes_vectorized", &sparse::sliced_bytes_vectorized,
        "whether the active ISA runs the sliced byte layout with a vector kernel (AVX-512 VBMI), not the scalar spec");
  m.def(
      "sparse_sliced_steps",
      [](std::uintptr_t row_ptr, int64_t n, std::uintptr_t blk_idx, std::uintptr_t values, int64_t k, bool bytes) {
        py::gil_scoped_release release;
        return sparse::sliced_steps(ptr<const int32_t>(row_ptr), n, ptr<const uint16_t>(blk_idx),
                                    ptr<const int8_t>(values), k, bytes);
      },
      "number of steps of the sliced layout (bytes: the byte layout) of a validated bsr1x4 pack");
  m.def(
      "sparse_build_sliced",
      [](std::uintptr_t row_ptr, int64_t n, std::uintptr_t blk_idx, std::uintptr_t values, int64_t k,
         std::uintptr_t slice_ptr, std::uintptr_t step_base, std::uintptr_t step_lane, bool bytes,
         std::uintptr_t out_values, int64_t nsteps) {
        py::gil_scoped_release release;
        sparse::build_sliced(ptr<const int32_t>(row_ptr), n, ptr<const uint16_t>(blk_idx), ptr<const int8_t>(values), k,
                             bytes, ptr<int32_t>(slice_ptr), ptr<uint16_t>(step_base),
                             bytes ? nullptr : ptr<uint32_t>(step_lane), bytes ? ptr<uint8_t>(step_lane) : nullptr,
                             ptr<int8_t>(out_values), nsteps);
      },
      "fills a sliced pack (sized by sparse_sliced_steps; bytes: the byte layout, step_lane then holds the "
      "positions) from a validated bsr1x4 pack");
  m.def(
      "sparse_sliced_linear",
      [](int64_t n, int64_t k, std::uintptr_t slice_ptr, std::uintptr_t step_base, std::uintptr_t step_lane,
         bool bytes, std::uintptr_t values, std::uintptr_t col_sum, std::uintptr_t w_scale, std::uintptr_t x,
         int64_t m, int64_t ldx, std::uintptr_t bias, int act, bool is_static, float static_scale, int32_t static_zp,
         std::uintptr_t y, int64_t ldy, int nthreads) {
        sparse::SlicedLinearArgs a{};
        a.w = sliced_weights(n, k, slice_ptr, step_base, step_lane, bytes, values, col_sum, w_scale);
        set_q8_call(a, x, m, ldx, bias, act, is_static, static_scale, static_zp, y, ldy, nthreads);
        py::gil_scoped_release release;
        sparse::sliced_linear(a);
      },
      "y = act(dequant(quant(x) @ W^T) + bias) with a validated sliced int8 pack (bytes: the byte layout), on "
      "the active ISA");
  m.def(
      "sparse_sliced_accumulate_raw",
      [](int64_t n, int64_t k, std::uintptr_t slice_ptr, std::uintptr_t step_base, std::uintptr_t step_lane,
         bool bytes, std::uintptr_t values, std::uintptr_t q, int64_t m, std::uintptr_t out, int nthreads) {
        const sparse::SlicedWeights w = sliced_weights(n, k, slice_ptr, step_base, step_lane, bytes, values, 0, 0);
        py::gil_scoped_release release;
        sparse::sliced_accumulate_raw(w, ptr<const uint8_t>(q), m, ptr<int32_t>(out), nthreads);
      },
      "test hook: raw int32 accumulators of quantized rows [m][max(round_up(K,4), 64)] against a sliced pack");
}
