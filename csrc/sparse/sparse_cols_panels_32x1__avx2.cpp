// AVX2 cols kernels over the csr panel layout (sparse.h), tile up to 32 rows
// (4 ymm) x 1 output channel, per panel segment; also the narrow variant
// (2 to kNarrowPanelRows rows, x^T rows of 8 floats) of the AVX2 and of the
// AVX-512 levels.
#include <immintrin.h>

#include <cstring>

#include "common/vec_math_avx2.h"
#include "sparse/sparse_avx2.h"
#include "sparse/sparse_kernels.h"
#include "sparse/sparse_panels.h"

namespace pycompress {
namespace sparse {
namespace {

// One run of csr panel entries [j, j1) (segments are padded to multiples of 4,
// sparse.h) into out (MV ymm of 8 rows); x^T row stride the constant LD floats
// (the driver's ld: 16 for up to 16 rows, 32 above). Weights are broadcast
// straight from memory (a load, no shuffle on AVX2 CPUs).
// S accumulator sets take the entries in turn (4 entries per iteration: with
// S = 4 no faster than 2 on Zen 4, noisy).
template <int MV, int LD, int S>
inline void f32_panel_run8(const float* xt, const float* vals, const uint16_t* idx, int64_t j, int64_t j1,
                           __m256* out) {
  __m256 acc[S][MV];
#pragma GCC unroll 4
  for (int v = 0; v < MV; ++v) {
    acc[0][v] = out[v];
#pragma GCC unroll 4
    for (int s = 1; s < S; ++s) acc[s][v] = _mm256_setzero_ps();
  }
  auto fma = [&](int s, const float* w, uint64_t k) {
    const __m256 wb = _mm256_broadcast_ss(w);
    const float* xr = xt + static_cast<int64_t>(k) * LD;
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[s][v] = _mm256_fmadd_ps(wb, _mm256_load_ps(xr + 8 * v), acc[s][v]);
  };
  for (; j < j1; j += 4) {
    uint64_t ks;
    std::memcpy(&ks, idx + j, sizeof ks);
    fma(0, vals + j, ks & 0xFFFFu);
    fma(1 % S, vals + j + 1, (ks >> 16) & 0xFFFFu);
    fma(2 % S, vals + j + 2, (ks >> 32) & 0xFFFFu);
    fma(3 % S, vals + j + 3, ks >> 48);
  }
#pragma GCC unroll 4
  for (int v = 0; v < MV; ++v) {
#pragma GCC unroll 4
    for (int s = 1; s < S; ++s) acc[0][v] = _mm256_add_ps(acc[0][v], acc[s][v]);
    out[v] = acc[0][v];
  }
}

// Cols kernel over csr panels: panels_loop (sparse_panels.h) with each
// channel's partial sums as MV ymm of 8 rows; after the last panel the
// epilogue runs on 8 x 8 transposed tiles.
template <int MV, int LD, int S = (MV <= 2 ? 2 : 1)>
void f32_cols_panels_mv(const F32Task& t) {
  const CsrPanels& pn = *t.w->panels;
  panels_loop<MV * 8, 8, 8>(
      t.n0, t.n1, t.w->n, csr_panels_count(t.w->k), pn.sub,
      [&](uint32_t* part, int32_t j0, int32_t j1, bool first) {
        float* pr = reinterpret_cast<float*>(part);
        __m256 sums[MV];
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) sums[v] = first ? _mm256_setzero_ps() : _mm256_load_ps(pr + 8 * v);
        f32_panel_run8<MV, LD, S>(t.xt, pn.values, pn.idx, j0, j1, sums);
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) _mm256_store_ps(pr + 8 * v, sums[v]);
      },
      [&](int64_t c0, int64_t channels, auto part_of) {
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) {
          f32_store_tile8(t, c0, channels, 8 * v,
                          [&](int c) { return reinterpret_cast<const float*>(part_of(c)) + 8 * v; });
        }
      });
}

}  // namespace

// 2 to kNarrowPanelRows rows, x^T rows of 8 floats (sparse.h, kNarrowPanelRows).
void f32_cols_panels_narrow_avx2(const F32Task& t) {
  static_assert(kNarrowPanelRows == 8, "one ymm of rows");
  f32_cols_panels_mv<1, 8>(t);
}

// The AVX-512 level's narrow panels: ymm code with the four accumulator sets
// of the AVX-512 cols kernels (acc_sets<1>, sparse_avx512.h), so a row whose
// nonzeros lie in one panel sums in the order of the AVX-512 plain cols kernel.
void f32_cols_panels_narrow_s4(const F32Task& t) { f32_cols_panels_mv<1, 8, 4>(t); }

void f32_cols_panels_avx2(const F32Task& t) {
  static_assert(kPanelBlockRows == 32, "the driver hands this kernel at most 32 rows, ld 16 or 32");
  switch ((t.m + 7) / 8) {
    case 1: return t.ldxt == 16 ? f32_cols_panels_mv<1, 16>(t) : f32_cols_panels_mv<1, 32>(t);
    case 2: return t.ldxt == 16 ? f32_cols_panels_mv<2, 16>(t) : f32_cols_panels_mv<2, 32>(t);
    case 3: return f32_cols_panels_mv<3, 32>(t);
    default: return f32_cols_panels_mv<4, 32>(t);
  }
}

}  // namespace sparse
}  // namespace pycompress
