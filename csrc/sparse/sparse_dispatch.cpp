// The sparse kernels' table for each ISA level (csrc/common/isa.h pick_kernels).
#include "sparse/sparse.h"

namespace pycompress {
namespace sparse {

const Kernels& kernels_for(Isa isa) {
  static const Kernels& (*const tables[kIsaCount])() = {
      &kernels_scalar, PYCOMPRESS_X86_TABLE(kernels_avx2), nullptr, PYCOMPRESS_X86_TABLE(kernels_avx512vnni),
      PYCOMPRESS_X86_TABLE(kernels_avx512vbmi)};
  return pick_kernels(isa, tables);
}

bool sliced_bytes_vectorized() {
  return kernels_for(active_isa()).q8_sliced_bytes != kernels_scalar().q8_sliced_bytes;
}

}  // namespace sparse
}  // namespace pycompress
