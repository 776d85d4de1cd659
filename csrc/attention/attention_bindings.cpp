// pybind11 bindings of the fused attention. Raw pointers, sizes and strides in
// elements: pycompress/ops/attention.py checks dtypes, devices and shapes first.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "attention/attention.h"
#include "bindings_util.h"

namespace py = pybind11;
using namespace pycompress;
using bindings::ptr;

void register_attention_bindings(py::module_& m) {
  m.def(
      "attention",
      [](std::uintptr_t q, int64_t q_sb, int64_t q_sh, int64_t q_ss, std::uintptr_t k, int64_t k_sb, int64_t k_sh,
         int64_t k_ss, std::uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_ss, int64_t batch, int64_t heads,
         int64_t sq, int64_t sk, int64_t d, int64_t dv, int mask_kind, std::uintptr_t mask, int64_t m_sb, int64_t m_sh,
         int64_t m_ss, int64_t m_sk, bool causal, float scale, std::uintptr_t out, int nthreads) {
        attention::AttentionArgs a{ptr<const float>(q), q_sb, q_sh, q_ss, ptr<const float>(k), k_sb, k_sh, k_ss,
                                   ptr<const float>(v), v_sb, v_sh, v_ss, batch, heads, sq, sk, d, dv,
                                   static_cast<attention::MaskKind>(mask_kind), ptr<const void>(mask),
                                   m_sb, m_sh, m_ss, m_sk, causal, scale, ptr<float>(out), nthreads};
        py::gil_scoped_release release;
        attention::attention(a);
      },
      "out[B, Sq, H, Dv] = softmax(scale * q k^T + mask) v on the active ISA (strides in elements)");
  m.def(
      "attention_exp2",
      [](std::uintptr_t x, std::uintptr_t y, int64_t n) {
        py::gil_scoped_release release;
        attention::exp2_active(ptr<const float>(x), ptr<float>(y), n);
      },
      "test hook: y = 2^x with the active ISA's exp2 (the softmax's exponential)");
}
