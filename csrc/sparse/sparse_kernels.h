// The sparse kernels, declared per file: csrc/sparse/sparse_<op>_<tile>__<isa>.cpp
// (the grammar of csrc/README.md; the tile is output rows x output channels of
// one microkernel call, the largest the kernel runs). sparse_dispatch.cpp
// assembles them into the table of each ISA level (Kernels, sparse.h); nothing
// else calls them.
#pragma once

#include "sparse/sparse.h"

namespace pycompress {
namespace sparse {

// sparse_rows_1x1__scalar.cpp: the specification; the scalar level serves every M with it.
void f32_rows_scalar(const F32Task& t);
void q8_rows_scalar(const Q8Task& t);
// sparse_sliced_1x16__scalar.cpp: both sliced layouts (the byte layout on every level without vpermb).
void q8_sliced_scalar(const SlicedTask& t);

#if PYCOMPRESS_X86
// sparse_rows_1x1__avx2.cpp (the fp32 one also serves the AVX-512 levels).
void f32_rows_avx2(const F32Task& t);
void q8_rows_avx2(const Q8Task& t);
// sparse_cols_32x1__avx2.cpp
void f32_cols_avx2(const F32Task& t);
void q8_cols_avx2(const Q8Task& t);
// sparse_cols_panels_32x1__avx2.cpp: csr panels; the narrow ones (x^T rows of 8
// floats) of the AVX2 level and, with the AVX-512 kernels' summation order, of
// the AVX-512 levels (_s4).
void f32_cols_panels_avx2(const F32Task& t);
void f32_cols_panels_narrow_avx2(const F32Task& t);
void f32_cols_panels_narrow_s4(const F32Task& t);
// sparse_sliced_1x16__avx2.cpp: the group layout.
void q8_sliced_avx2(const SlicedTask& t);

// sparse_rows_3x1__avx512vnni.cpp (int8).
void q8_rows_avx512(const Q8Task& t);
// sparse_cols_128x1__avx512vnni.cpp
void f32_cols_avx512(const F32Task& t);
void q8_cols_avx512(const Q8Task& t);
// sparse_cols_panels_32x1__avx512vnni.cpp: csr and bsr1x4 panels.
void f32_cols_panels_avx512(const F32Task& t);
void q8_cols_panels_avx512(const Q8Task& t);
// sparse_sliced_4x16__avx512vnni.cpp: the group layout.
void q8_sliced_avx512(const SlicedTask& t);

// sparse_sliced_bytes_4x16__avx512vbmi.cpp: the byte layout (vpermb).
void q8_sliced_bytes_avx512vbmi(const SlicedTask& t);
#endif

}  // namespace sparse
}  // namespace pycompress
