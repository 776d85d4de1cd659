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
#include "common/thread_tuner.h"
#include "q8/q8_gemm.h"

namespace py = pybind11;
using namespace pycompress;
using bindings::parse_activation;
using bindings::ptr;
using bindings::tuning_dict;

void register_sparse_bindings(py::module_& m);   // csrc/sparse/sparse_bindings.cpp
void register_entropy_bindings(py::module_& m);  // csrc/entropy/entropy_bindings.cpp
void register_attention_bindings(py::module_& m);  // csrc/attention/attention_bindings.cpp
void register_cuda_emulate_bindings(py::module_& m);  // csrc/cuda/cuda_emulate_bindings.cpp

namespace {

std::vector<std::string> isa_names(const std::vector<Isa>& isas) {
  std::vector<std::string> names;
  for (Isa isa : isas) names.emplace_back(isa_name(isa));
  return names;
}

// The 4-bit operands of a q8::LinearOutput (all 0: int8 weights).
void set_w4(q8::LinearOutput& out, std::uintptr_t w4, std::uintptr_t g_scale, std::uintptr_t corr, int64_t groups) {
  out.w4 = ptr<const uint8_t>(w4);
  out.g_scale = ptr<const float>(g_scale);
  out.corr = ptr<const float>(corr);
  out.groups = groups;
}

// One dense int8 or 4-bit linear with its weight-side operands bound once:
// pycompress.nn.Int8Linear keeps one per layer (validated by
// pycompress.ops.q8.int8_linear_plan, rebuilt whenever a buffer is replaced or
// its storage moves), so an eager call passes only x, y and the thread count
// (bench/README.md: per-call overhead).
class Q8LinearPlan {
 public:
  Q8LinearPlan(std::uintptr_t w_packed, std::uintptr_t col_sum, std::uintptr_t w_scale, std::uintptr_t bias,
               int64_t k, int64_t n, int act, bool is_static, float static_scale, int32_t static_zp, int act_bits,
               std::uintptr_t w4, std::uintptr_t g_scale, std::uintptr_t corr, int64_t groups)
      : k_(k),
        is_static_(is_static),
        static_scale_(static_scale),
        static_zp_(static_zp),
        act_bits_(act_bits),
        out_{ptr<const int8_t>(w_packed), ptr<const int32_t>(col_sum), ptr<const float>(w_scale),
             ptr<const float>(bias), n, nullptr, n, parse_activation(act)} {
    set_w4(out_, w4, g_scale, corr, groups);
  }

  const ThreadTuner& tuner() const { return tuner_; }

  // y[m, n] (contiguous) = the linear of x's m rows (row stride ldx).
  void run(std::uintptr_t x, int64_t m, int64_t ldx, std::uintptr_t y, int nthreads) const {
    const q8::SharedInput in{ptr<const float>(x), m, k_, ldx, is_static_, static_scale_, static_zp_, nthreads,
                             nullptr, &tuner_, act_bits_};
    q8::LinearOutput out = out_;
    out.y = ptr<float>(y);
    py::gil_scoped_release release;
    q8::linear_shared_input(in, &out, 1);
  }

 private:
  int64_t k_;
  bool is_static_;
  float static_scale_;
  int32_t static_zp_;
  int act_bits_;
  q8::LinearOutput out_;
  mutable ThreadTuner tuner_;  // this layer's small calls learn their thread count
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pycompress native kernels (torch-free; see pycompress.ops for the torch ops)";

  m.def("build_info", [] {
    py::dict d;
    d["version"] = PYCOMPRESS_VERSION;
    d["compiled_isas"] = isa_names(compiled_isas());
    d["supported_isas"] = isa_names(supported_isas());
    std::vector<Isa> levels;
    for (int i = 0; i < kIsaCount; ++i) levels.push_back(static_cast<Isa>(i));
    d["isa_levels"] = isa_names(levels);  // every level's name, lowest first (csrc/common/isa.h)
    d["active_isa"] = std::string(isa_name(active_isa()));
    d["avx512_vbmi"] = cpu_has_avx512vbmi();  // the CPU's; the active level decides what runs
    d["pool_workers"] = thread_pool_workers();
    d["threading"] = std::string(threading_backend());
    return d;
  });
  m.def("set_isa", [](const std::string& name) { set_active_isa(parse_isa(name)); }, py::arg("name"));
  m.def("q8_u7_kernel", [] { return q8::kernels_for(active_isa()).gemm_tile_u7 != nullptr; },
        "whether the active ISA runs u7 activations on a kernel of their own (faster than its u8 one)");
  m.def("get_isa", [] { return std::string(isa_name(active_isa())); });

  m.def(
      "q8_linear",
      [](std::uintptr_t x, int64_t m, int64_t k, int64_t ldx, std::uintptr_t w_packed, std::uintptr_t col_sum,
         std::uintptr_t w_scale, std::uintptr_t bias, int64_t n, std::uintptr_t y, int64_t ldy, int act,
         bool is_static, float static_scale, int32_t static_zp, int nthreads, int act_bits, std::uintptr_t w4,
         std::uintptr_t g_scale, std::uintptr_t corr, int64_t groups) {
        const q8::SharedInput in{ptr<const float>(x), m, k, ldx, is_static, static_scale, static_zp, nthreads,
                                 nullptr, nullptr, act_bits};
        q8::LinearOutput out{ptr<const int8_t>(w_packed), ptr<const int32_t>(col_sum),
                             ptr<const float>(w_scale), ptr<const float>(bias), n, ptr<float>(y), ldy,
                             parse_activation(act)};
        set_w4(out, w4, g_scale, corr, groups);
        py::gil_scoped_release release;
        q8::linear_shared_input(in, &out, 1);
      },
      py::arg("x"), py::arg("m"), py::arg("k"), py::arg("ldx"), py::arg("w_packed"), py::arg("col_sum"),
      py::arg("w_scale"), py::arg("bias"), py::arg("n"), py::arg("y"), py::arg("ldy"), py::arg("act"),
      py::arg("is_static"), py::arg("static_scale"), py::arg("static_zp"), py::arg("nthreads"),
      py::arg("act_bits") = 8, py::arg("w4") = 0, py::arg("g_scale") = 0, py::arg("corr") = 0, py::arg("groups") = 0,
      "y[m, n] = act(dequant(quant(x) @ W^T) + bias) on the active ISA; int8 weights, or 4-bit ones when w4 "
      "is set (w4, g_scale, corr, groups: csrc/q4/q4_gemm.h; w_packed, col_sum, w_scale are then unused)");

  py::class_<Q8LinearPlan>(m, "Q8LinearPlan")
      .def(py::init<std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int64_t, int, bool,
                    float, int32_t, int, std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t>(),
           py::arg("w_packed"), py::arg("col_sum"), py::arg("w_scale"), py::arg("bias"), py::arg("k"),
           py::arg("n"), py::arg("act"), py::arg("is_static"), py::arg("static_scale"), py::arg("static_zp"),
           py::arg("act_bits") = 8, py::arg("w4") = 0, py::arg("g_scale") = 0, py::arg("corr") = 0,
           py::arg("groups") = 0)
      .def("run", &Q8LinearPlan::run, "y[m, n] = the bound linear of x (m rows, row stride ldx)")
      .def("thread_tuning", [](const Q8LinearPlan& p) { return tuning_dict(p.tuner()); },
           "what this layer's small calls learned: team size and ns per call on one thread and on the team");

  // The tuner alone, driven by made-up timings (tests/test_threads.py).
  py::class_<ThreadTuner>(m, "ThreadTuner")
      .def(py::init<>())
      .def_property_readonly_static("MIN_WORK_PER_THREAD", [](py::object) { return ThreadTuner::kMinWorkPerThread; })
      .def_property_readonly_static("SURE_WORK_PER_THREAD", [](py::object) { return ThreadTuner::kSureWorkPerThread; })
      .def_property_readonly_static("REPROBE", [](py::object) { return ThreadTuner::kReprobe; })
      .def(
          "choose",
          [](ThreadTuner& t, int requested, int64_t work) {
            const ThreadTuner::Choice c = ThreadTuner::choose(&t, requested, work, int64_t{1} << 20);
            return py::make_tuple(c.threads, c.slot);
          },
          py::arg("requested"), py::arg("work"), "(threads, slot) for one call; slot -1: not timed")
      .def(
          "record",
          [](ThreadTuner& t, int threads, int slot, int64_t ns) {
            t.record(ThreadTuner::Choice{threads, slot}, std::chrono::nanoseconds(ns));
          },
          py::arg("threads"), py::arg("slot"), py::arg("ns"))
      .def("tuning", [](const ThreadTuner& t) { return tuning_dict(t); });

  m.def(
      "q8_linear_shared_input",
      [](std::uintptr_t x, int64_t m, int64_t k, int64_t ldx, const std::vector<py::tuple>& outputs,
         bool is_static, float static_scale, int32_t static_zp, int nthreads, ThreadTuner* tuner, int act_bits) {
        // outputs: (w_packed, col_sum, w_scale, bias or 0, n, y, ldy, act) per int8 linear, the same
        // followed by (w4, g_scale, corr, groups) per 4-bit one.
        std::vector<q8::LinearOutput> outs;
        outs.reserve(outputs.size());
        for (const py::tuple& o : outputs) {
          if (o.size() != 8 && o.size() != 12) {
            throw py::value_error("q8_linear_shared_input: each output is an 8-tuple (int8) or a 12-tuple (4-bit)");
          }
          outs.push_back(q8::LinearOutput{ptr<const int8_t>(o[0].cast<std::uintptr_t>()),
                                          ptr<const int32_t>(o[1].cast<std::uintptr_t>()),
                                          ptr<const float>(o[2].cast<std::uintptr_t>()),
                                          ptr<const float>(o[3].cast<std::uintptr_t>()), o[4].cast<int64_t>(),
                                          ptr<float>(o[5].cast<std::uintptr_t>()), o[6].cast<int64_t>(),
                                          parse_activation(o[7].cast<int>())});
          if (o.size() == 12) {
            set_w4(outs.back(), o[8].cast<std::uintptr_t>(), o[9].cast<std::uintptr_t>(),
                   o[10].cast<std::uintptr_t>(), o[11].cast<int64_t>());
          }
        }
        const q8::SharedInput in{ptr<const float>(x), m, k, ldx, is_static, static_scale, static_zp, nthreads,
                                 nullptr, tuner, act_bits};
        py::gil_scoped_release release;
        q8::linear_shared_input(in, outs.data(), static_cast<int>(outs.size()));
      },
      py::arg("x"), py::arg("m"), py::arg("k"), py::arg("ldx"), py::arg("outputs"), py::arg("is_static"),
      py::arg("static_scale"), py::arg("static_zp"), py::arg("nthreads"), py::arg("tuner").none(true) = nullptr,
      py::arg("act_bits") = 8,
      "several int8 linears of one x: x quantized once, every output's tiles in one parallel pass "
      "(tuner: the ThreadTuner of a repeated call, or None)");

  m.def(
      "q8_conv2d_nhwc",
      [](std::uintptr_t x, const std::vector<int64_t>& strides, const std::vector<int64_t>& shape,
         const std::vector<int64_t>& geometry, std::uintptr_t w_packed, std::uintptr_t col_sum,
         std::uintptr_t w_scale, std::uintptr_t bias, int64_t n, std::uintptr_t y, int act, bool is_static,
         float static_scale, int32_t static_zp, int nthreads, int act_bits) {
        // strides (n, h, w) in floats, shape (batch, h, w, c), geometry (ho, wo, kh, kw, sh, sw, ph, pw, dh, dw);
        // y is [batch * ho * wo, n] (NHWC).
        if (strides.size() != 3 || shape.size() != 4 || geometry.size() != 10) {
          throw py::value_error("q8_conv2d_nhwc: strides, shape and geometry need 3, 4 and 10 entries");
        }
        const q8::Im2col g{ptr<const float>(x), strides[0], strides[1], strides[2], shape[0], shape[1],
                           shape[2], shape[3], geometry[0], geometry[1], geometry[2], geometry[3],
                           geometry[4], geometry[5], geometry[6], geometry[7], geometry[8], geometry[9]};
        const int64_t m = g.batch * g.ho * g.wo, k = g.kh * g.kw * g.c;
        const q8::SharedInput in{nullptr, m, k, k, is_static, static_scale, static_zp, nthreads, &g, nullptr, act_bits};
        const q8::LinearOutput out{ptr<const int8_t>(w_packed), ptr<const int32_t>(col_sum),
                                   ptr<const float>(w_scale), ptr<const float>(bias), n, ptr<float>(y), n,
                                   parse_activation(act)};
        py::gil_scoped_release release;
        q8::linear_shared_input(in, &out, 1);
      },
      py::arg("x"), py::arg("strides"), py::arg("shape"), py::arg("geometry"), py::arg("w_packed"),
      py::arg("col_sum"), py::arg("w_scale"), py::arg("bias"), py::arg("n"), py::arg("y"), py::arg("act"),
      py::arg("is_static"), py::arg("static_scale"), py::arg("static_zp"), py::arg("nthreads"),
      py::arg("act_bits") = 8,
      "int8 conv2d (groups=1) of an NHWC float input: im2col rows quantized straight from x, then the GEMM");

  m.def(
      "q8_quantize_rows",
      [](std::uintptr_t x, int64_t m, int64_t k, int64_t ldx, std::uintptr_t q, std::uintptr_t scale,
         std::uintptr_t zp, std::uintptr_t nonfinite, bool is_static, float static_scale, int32_t static_zp,
         int act_bits) {
        py::gil_scoped_release release;
        q8::quantize_rows(ptr<const float>(x), m, k, ldx, ptr<uint8_t>(q), ptr<float>(scale), ptr<int32_t>(zp),
                          ptr<uint8_t>(nonfinite), is_static, static_scale, static_zp, act_bits);
      },
      py::arg("x"), py::arg("m"), py::arg("k"), py::arg("ldx"), py::arg("q"), py::arg("scale"), py::arg("zp"),
      py::arg("nonfinite"), py::arg("is_static"), py::arg("static_scale"), py::arg("static_zp"),
      py::arg("act_bits") = 8, "test hook: the activation quantization stage alone");

  m.def(
      "q8_gemm_raw",
      [](std::uintptr_t q, int64_t m, int64_t kp, std::uintptr_t w_packed, int64_t n, std::uintptr_t out,
         int nthreads, bool u7) {
        py::gil_scoped_release release;
        q8::gemm_raw(ptr<const uint8_t>(q), m, kp, ptr<const int8_t>(w_packed), n, ptr<int32_t>(out), nthreads, u7);
      },
      py::arg("q"), py::arg("m"), py::arg("kp"), py::arg("w_packed"), py::arg("n"), py::arg("out"),
      py::arg("nthreads"), py::arg("u7") = false,
      "test hook: raw int32 accumulators of quantized rows against packed weights (u7: the u7 kernel, q <= 127)");

  register_sparse_bindings(m);
  register_entropy_bindings(m);
  register_attention_bindings(m);
  register_cuda_emulate_bindings(m);
}
