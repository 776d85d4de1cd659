// W4A8 linear on int8 tensor cores (sm_80 and later): the int8 linear's per-row activation quantization, then
// mma.sync m16n8k32 s8 (the 4-bit weights, unpacked from the CPU's w4 pack in registers) x u8 (the activation
// rows) -> s32, exact int32 sums per group, then the CPU's epilogue: the groups' float terms added in group order,
// the zero point's correction, the row scale, bias and activation, one IEEE float32 rounding each, so y equals the
// CPU's y bit for bit. The plan, fragments, unpacking and epilogue steps: q4_cuda_tiling.h (shared with the CPU
// emulation the tests run).
//
// A block: one panel of 16 channels x 8 activation rows, 8 warps. With groups, the warps take 8 groups at a time,
// one each (its steps streamed straight from global memory: a 4-byte word a register, no reuse to stage), park
// their int32 sums in shared memory, and 128 threads (one an output) fold them into their float sums in group
// order; with one group per channel the warps share its steps and add their int32 sums. Built for decode (the
// weight bytes bound it); every 8 rows re-read the weights.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/q4_cuda_tiling.h"
#include "cuda/q8_cuda.h"
#include "cuda/q8_cuda_device.cuh"
#include "cuda/q8_cuda_tiling.h"

namespace pycompress {
namespace q8cuda {
namespace {

struct Q4Args {
  const uint8_t* q;  // quantized rows, stride ldq
  int64_t m, n, ldq, kp, steps, groups, steps_per_group;
  const uint8_t* w4;
  const float* g_scale;
  const float* corr;
  Epilogue out;  // the per-row operands, bias, activation and y (col_sum / w_scale unused: corr and g_scale here)
};

__device__ __forceinline__ void mma_s8u8(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// acc += this warp's steps [s0, s1) of its panel.
__device__ __forceinline__ void q4_steps(const Q4Args& g, int64_t panel, const uint8_t* brow, int lane, int64_t s0,
                                         int64_t s1, int64_t stride, int32_t (&acc)[4]) {
  for (int64_t s = s0; s < s1; s += stride) {
    uint32_t a[4], b[2] = {0, 0};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const Q4Word w = q4_a_word(panel, g.kp, s, lane, r);
      a[r] = w.valid ? q4_unpack(__ldg(reinterpret_cast<const uint32_t*>(g.w4 + w.offset)), w.shift) : 0u;
    }
    if (brow != nullptr) {
#pragma unroll
      for (int r = 0; r < 2; ++r) b[r] = __ldg(reinterpret_cast<const uint32_t*>(brow + s * kQ4Step + b_frag_k(lane, r)));
    }
    mma_s8u8(acc, a, b);
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kQ4Warps * 32) q4_gemm(Q4Args g) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x;
  const int64_t panel = blockIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kQ4Rows;
  // This lane's B rows: activation row r0 + b_frag_n(lane) (nullptr past M: zeros).
  const int64_t brow_index = r0 + b_frag_n(lane);
  const uint8_t* brow = brow_index < g.m ? g.q + brow_index * g.ldq : nullptr;
  // sums[warp][e * 32 + lane]: a warp's int32 sums; output i = e * 32 + lane of the block is thread i's.
  __shared__ int32_t sums[kQ4Warps][4 * 32];
  float facc = 0.0f;  // thread tid < 128: the float group sum of output tid
  auto park = [&](const int32_t (&acc)[4]) {
#pragma unroll
    for (int e = 0; e < 4; ++e) sums[warp][e * 32 + lane] = acc[e];
  };
  if (g.groups == 1) {
    int32_t acc[4] = {0, 0, 0, 0};
    q4_steps(g, panel, brow, lane, warp, g.steps, kQ4Warps, acc);
    park(acc);
    __syncthreads();
    if (tid < 4 * 32) {
      uint32_t total = 0;  // the warps' shares of the one group: exact int32 (wrapping, as the CPU's)
#pragma unroll
      for (int w = 0; w < kQ4Warps; ++w) total += static_cast<uint32_t>(sums[w][tid]);
      facc = q4_fold(0.0f, static_cast<int32_t>(total), g.g_scale[q4_scale_index(panel * kPanel + c_frag_row(tid & 31, tid >> 5), 1, 0)]);
    }
  } else {
    for (int64_t g0 = 0; g0 < g.groups; g0 += kQ4Warps) {
      const int64_t grp = g0 + warp;
      int32_t acc[4] = {0, 0, 0, 0};
      if (grp < g.groups) q4_steps(g, panel, brow, lane, grp * g.steps_per_group, (grp + 1) * g.steps_per_group, 1, acc);
      park(acc);
      __syncthreads();
      if (tid < 4 * 32) {
        const int64_t channel = panel * kPanel + c_frag_row(tid & 31, tid >> 5);
        const int64_t batch = g.groups - g0 < kQ4Warps ? g.groups - g0 : kQ4Warps;
        for (int w = 0; w < batch; ++w)  // in group order
          facc = q4_fold(facc, sums[w][tid], g.g_scale[q4_scale_index(channel, g.groups, g0 + w)]);
      }
      __syncthreads();  // the sums are read before the next batch parks its own
    }
  }
  if (tid >= 4 * 32) return;
  const int e = tid >> 5, l = tid & 31;
  const int64_t channel = panel * kPanel + c_frag_row(l, e), row = r0 + c_frag_col(l, e);
  if (channel >= g.n || row >= g.m) return;
  g.out.finish<OutT>(row, channel, [&] {
    return q4_dequantize(facc, g.out.row_zp[row], g.corr[channel], g.out.row_scale[row]);
  });
}

template <typename OutT>
std::string launch(const LinearArgs& a, const Q4Plan& p) {
  const uint8_t* q = static_cast<const uint8_t*>(a.scratch) + scratch_layout(a.m, a.k).q;
  Q4Args g{q, a.m, a.n, p.ldq, p.kp, p.steps, p.groups, p.steps_per_group, a.w4, a.g_scale, a.corr, epilogue_of(a)};
  const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y));
  q4_gemm<OutT><<<grid, kQ4Warps * 32, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(g);
  return launch_error("q4_gemm");
}

}  // namespace

std::string q4_linear(const LinearArgs& a) {
  Q4Plan p;
  const char* why = nullptr;
  if (!q4_plan(a.m, a.n, a.k, a.groups, &p, &why)) return why;
  if (a.m == 0) return "";
  if (reinterpret_cast<std::uintptr_t>(a.w4) % 4 != 0) return "the packed 4-bit weights must be 4-byte aligned";
  std::string err = quantize(a);
  if (!err.empty()) return err;
  return with_dtype(a.dtype, [&](auto t) { return launch<decltype(t)>(a, p); });
}

}  // namespace q8cuda
}  // namespace pycompress
