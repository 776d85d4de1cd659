// The sparse kernels' table for each ISA level (csrc/common/isa.h pick_kernels),
// assembled from the kernel files (sparse_kernels.h). Compiled without ISA flags:
// it only takes the kernels' addresses.
#include "sparse/sparse.h"
#include "sparse/sparse_kernels.h"

namespace pycompress {
namespace sparse {
namespace {

const Kernels& kernels_scalar() {
  static const Kernels k{f32_rows_scalar, nullptr, nullptr, nullptr, q8_rows_scalar, nullptr, nullptr, q8_sliced_scalar,
                         q8_sliced_scalar};
  return k;
}

#if PYCOMPRESS_X86
const Kernels& kernels_avx2() {
  // No vpermb below AVX-512 VBMI: the byte layout runs the scalar spec (SparseInt8Linear never picks it here);
  // no bsr1x4 panels: the AVX2 int8 cols kernel is vpmaddwd-bound, not cache-bound (sparse.h).
  static const Kernels k{f32_rows_avx2, f32_cols_avx2, f32_cols_panels_avx2, f32_cols_panels_narrow_avx2,
                         q8_rows_avx2, q8_cols_avx2, nullptr, q8_sliced_avx2, q8_sliced_scalar};
  return k;
}

const Kernels& kernels_avx512vnni() {
  // fp32 rows (M < 4) use the AVX2 kernel: on Zen 4 two 8-lane vgatherdps
  // beat one 16-lane gather (4096x4096 csr at 90%, M=1: 626 vs 815 us on one
  // thread, 341 vs 440 us on two). The 16-lane int8 gather wins (726 vs
  // 1001 us): each gathered dword carries a whole 1x4 block.
  static const Kernels k{f32_rows_avx2, f32_cols_avx512, f32_cols_panels_avx512, f32_cols_panels_narrow_s4,
                         q8_rows_avx512, q8_cols_avx512, q8_cols_panels_avx512, q8_sliced_avx512, q8_sliced_scalar};
  return k;
}

// The AVX-512 VNNI table with the byte layout's vpermb kernel.
const Kernels& kernels_avx512vbmi() {
  static const Kernels k = [] {
    Kernels table = kernels_avx512vnni();
    table.q8_sliced_bytes = q8_sliced_bytes_avx512vbmi;
    return table;
  }();
  return k;
}
#endif

}  // namespace

const Kernels& kernels_for(Isa isa) {
  static const Kernels& (*const tables[kIsaCount])() = {
      &kernels_scalar, PYCOMPRESS_X86_TABLE(kernels_avx2), nullptr, PYCOMPRESS_X86_TABLE(kernels_avx512vnni),
      PYCOMPRESS_X86_TABLE(kernels_avx512vbmi), nullptr};
  return pick_kernels(isa, tables);
}

bool sliced_bytes_vectorized() {
  return kernels_for(active_isa()).q8_sliced_bytes != kernels_scalar().q8_sliced_bytes;
}

}  // namespace sparse
}  // namespace pycompress
