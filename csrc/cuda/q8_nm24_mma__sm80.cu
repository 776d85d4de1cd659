// int8 linear over 2:4 sparse int8 weights on sparse tensor cores (sm_80 and later): the dense kernel's
// per-row activation quantization, then mma.sp m16n8k64 s8 (weights, 2 of every 4 k kept) x u8 (activation
// rows) -> s32, then the dense kernel's epilogue, so y equals the dense int8 kernel's y (and the CPU's) bit for
// bit. Half the weight bytes of the dense kernel (plus 1/8 for the metadata) and half its tensor-core steps.
// The pack, fragments and launch: q8_nm24_tiling.h (shared with the CPU emulation the tests run).
//
// Each warp streams its share of one panel's k steps straight from global memory into registers (one 16-byte
// load of values and one 4-byte load of metadata a lane per step, coalesced, each used once per row chunk),
// and reads the quantized activation rows through L1 (the same rows for every panel). Not yet: shared-memory
// staging of the activations for large M, where each row chunk re-reads the weights (from L2).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/q8_cuda.h"
#include "cuda/q8_cuda_device.cuh"
#include "cuda/q8_cuda_tiling.h"
#include "cuda/q8_nm24_tiling.h"

namespace pycompress {
namespace q8cuda {
namespace {

struct Nm24Args {
  const uint8_t* q;  // quantized rows, stride ldq (zero past K)
  int64_t m, n, ldq, steps;
  const uint4* values;    // [panels][steps][32] x 16 bytes
  const uint32_t* meta;   // [panels][steps][32]
  Epilogue out;
};

// Not volatile: a pure function of its registers, so the compiler may move the loads of later steps above it.
__device__ __forceinline__ void mma_sp_s8u8(int32_t (&c)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e) {
  asm(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.u8.s32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

template <int TILES, typename OutT>
__global__ void __launch_bounds__(kSpWarps * 32) q8_nm24(Nm24Args g) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t panel = blockIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * (8 * TILES);
  int32_t acc[TILES][4];
#pragma unroll
  for (int j = 0; j < TILES; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0;
  // The activation row each of this lane's B registers reads in column tile j (nullptr: past M, zeros).
  const uint8_t* brow[TILES];
#pragma unroll
  for (int j = 0; j < TILES; ++j) {
    const int64_t row = r0 + 8 * j + sp_b_n(lane);
    brow[j] = row < g.m ? g.q + row * g.ldq + sp_b_k(lane, 0) : nullptr;
  }
  const uint4* values = g.values + panel * g.steps * 32 + lane;
  const uint32_t* meta = g.meta + panel * g.steps * 32 + lane;
#pragma unroll 4
  for (int64_t s = warp; s < g.steps; s += kSpWarps) {
    const uint4 a = __ldcs(values + s * 32);  // read once: do not keep it in L1 / L2 ahead of the activations
    const uint32_t e = __ldcs(meta + s * 32);
#pragma unroll
    for (int j = 0; j < TILES; ++j) {
      uint32_t b[4] = {0, 0, 0, 0};
      if (brow[j] != nullptr) {
#pragma unroll
        for (int r = 0; r < 4; ++r) b[r] = __ldg(reinterpret_cast<const uint32_t*>(brow[j] + s * kSpK + 16 * r));
      }
      mma_sp_s8u8(acc[j], a, b, e);
    }
  }
  // The warps' sums of the same outputs, added in shared memory (exact int32: any order gives the same bits),
  // then one thread an output runs the epilogue.
  __shared__ int32_t sums[kSpWarps][TILES * 4][32];
#pragma unroll
  for (int j = 0; j < TILES; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) sums[warp][j * 4 + e][lane] = acc[j][e];
  __syncthreads();
  for (int i = threadIdx.x; i < TILES * 4 * 32; i += kSpWarps * 32) {
    const int je = i / 32, l = i % 32;
    uint32_t total = 0;  // wrapping, as the CPU's int32 sums; the exact total fits
#pragma unroll
    for (int w = 0; w < kSpWarps; ++w) total += static_cast<uint32_t>(sums[w][je][l]);
    const int64_t channel = panel * kPanel + c_frag_row(l, je % 4);
    const int64_t row = r0 + 8 * (je / 4) + c_frag_col(l, je % 4);
    if (channel < g.n && row < g.m) g.out.store<OutT>(static_cast<int32_t>(total), row, channel);
  }
}

template <typename OutT>
std::string launch_nm24(const LinearArgs& a, const Nm24Plan& p) {
  const Nm24Layout l = nm24_layout(a.n, a.k);
  const uint8_t* pack = reinterpret_cast<const uint8_t*>(a.nm24);
  Nm24Args g{static_cast<const uint8_t*>(a.scratch) + scratch_layout(a.m, a.k).q, a.m, a.n, p.ldq, p.steps,
             reinterpret_cast<const uint4*>(pack), reinterpret_cast<const uint32_t*>(pack + l.values_bytes),
             epilogue_of(a)};
  const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y));
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (p.tiles == 1) {
    q8_nm24<1, OutT><<<grid, kSpWarps * 32, 0, stream>>>(g);
  } else if (p.tiles == 2) {
    q8_nm24<2, OutT><<<grid, kSpWarps * 32, 0, stream>>>(g);
  } else {
    q8_nm24<4, OutT><<<grid, kSpWarps * 32, 0, stream>>>(g);
  }
  return launch_error("q8_nm24");
}

}  // namespace

std::string nm24_linear(const LinearArgs& a) {
  Nm24Plan p;
  const char* why = nullptr;
  if (!nm24_plan(a.m, a.n, a.k, &p, &why)) return why;
  if (a.m == 0) return "";
  if (a.nm24 == nullptr || reinterpret_cast<std::uintptr_t>(a.nm24) % kChunk != 0)
    return "the 2:4 pack must be given and 16-byte aligned";
  std::string err = quantize(a);
  if (!err.empty()) return err;
  return with_dtype(a.dtype, [&](auto t) { return launch_nm24<decltype(t)>(a, p); });
}

}  // namespace q8cuda
}  // namespace pycompress
