// pybind11 bindings of the Huffman codec (pycompress/entropy.py owns the buffers).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings_util.h"
#include "entropy/huffman.h"

namespace py = pybind11;
using namespace pycompress;
using bindings::ptr;

void register_entropy_bindings(py::module_& m) {
  m.def("huffman_max_code_length", [] { return entropy::kMaxCodeLength; });
  m.def(
      "huffman_encoded_bytes",
      [](std::uintptr_t symbols, int64_t n, std::uintptr_t lengths) {
        py::gil_scoped_release release;
        return entropy::huffman_encoded_bytes(ptr<const uint8_t>(symbols), n, ptr<const uint8_t>(lengths));
      },
      "bytes the canonical Huffman code with these 256 lengths needs for n symbols");
  m.def(
      "huffman_encode",
      [](std::uintptr_t symbols, int64_t n, std::uintptr_t lengths, std::uintptr_t out, int64_t out_bytes) {
        py::gil_scoped_release release;
        return entropy::huffman_encode(ptr<const uint8_t>(symbols), n, ptr<const uint8_t>(lengths), ptr<uint8_t>(out),
                                       out_bytes);
      },
      "encode n bytes; returns the number of bits written");
  m.def(
      "huffman_decode",
      [](std::uintptr_t in, int64_t in_bytes, std::uintptr_t lengths, std::uintptr_t out, int64_t n) {
        py::gil_scoped_release release;
        entropy::huffman_decode(ptr<const uint8_t>(in), in_bytes, ptr<const uint8_t>(lengths), ptr<uint8_t>(out), n);
      },
      "decode exactly n symbols; throws ValueError on a corrupt stream");
}
