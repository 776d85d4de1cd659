// int8 linear on Hopper tensor cores (sm_90a): the dense kernel's per-row activation quantization, then
// wgmma.mma_async m64n256k32 u8 x s8 -> s32 with both operands in shared memory (matrix descriptors), then
// the CPU's epilogue, so y equals the CPU's y bit for bit. mma.sync (q8_gemm_mma__sm80.cu) reaches about half of
// Hopper's int8 tensor-core rate; wgmma is what cuBLASLt's int8 uses there. The tiling, the shared-memory
// layout (the PTX ISA's canonical K-major layout without swizzling), the descriptors and the accumulator layout:
// q8_cuda_tiling.h (WgTile), shared with the CPU emulation the tests run.
//
// A block: 128 rows x 256 channels, two warpgroups of 64 rows, a 4-stage cp.async ring of 64-k steps (24 KiB a
// stage: the activation rows by 16-byte copies, each a core-matrix row; the packed weights by 4-byte copies, 4 k
// of one channel each, since the CPU's pack interleaves 16 channels x 4 k). Split-K as the other tiles (plan()).
// Each step: the copies' writes are made visible to the tensor cores' async proxy (fence.proxy.async), then two
// wgmma (32 k each) are issued; a step's wgmma are awaited one step later, before their stage is refilled (two
// steps of copies and one of wgmma in flight while a step is issued). Compiled to a trap for other
// architectures; linear() launches it only on compute capability 9.0 with this module built for sm_90a.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/q8_cuda.h"
#include "cuda/q8_cuda_device.cuh"
#include "cuda/q8_cuda_tiling.h"

namespace pycompress {
namespace q8cuda {
namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d += A (64 x 32 u8, descriptor a) x B^T (256 x 32 s8, descriptor b); d: this thread's 128 accumulators.
__device__ __forceinline__ void wgmma_m64n256k32_u8s8(int32_t (&d)[WgTile::kAcc], uint64_t a, uint64_t b) {
  // scale-d is a predicate (true: D = A x B + D), set from a register as the PTX ISA's examples do.
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.u8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
        "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
        "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
        "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
        "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
        "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
        "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),
        "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),
        "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "l"(a), "l"(b), "r"(1)
      : "memory");
}
#endif

template <typename OutT>
__global__ void __launch_bounds__(WgTile::kThreads, 1) q8_gemm_wgmma(GemmArgs g) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) uint8_t smem[];
  constexpr int S = WgTile::kStages;
  auto a_stage = [&](int s) { return smem + s * WgTile::kAStageBytes; };
  auto b_stage = [&](int s) { return smem + S * WgTile::kAStageBytes + s * WgTile::kBStageBytes; };
  const int tid = threadIdx.x, wg = tid >> 7, wtid = tid & 127;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * WgTile::kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * WgTile::kBN;
  const int64_t p0 = n0 / kPanel;
  const int64_t step0 = static_cast<int64_t>(blockIdx.z) * g.steps_per_split;
  const int64_t step1 = min(g.steps, step0 + g.steps_per_split);
  const int64_t steps = step1 - step0;

  int32_t acc[WgTile::kAcc];
#pragma unroll
  for (int i = 0; i < WgTile::kAcc; ++i) acc[i] = 0;

  auto load_step = [&](int64_t i) {
    if (i < steps) {
      const int s = static_cast<int>(i % S);
      const int64_t k0 = (step0 + i) * kBK;
#pragma unroll
      for (int c = tid; c < WgTile::kAChunks; c += WgTile::kThreads) {
        const Copy cp = wg_a_copy(c, m0, k0, g.m, g.ldq);
        cp_async16(a_stage(s) + cp.dst, g.q + cp.src, cp.valid);
      }
#pragma unroll 4
      for (int c = tid; c < WgTile::kBWords; c += WgTile::kThreads) {
        const Copy cp = wg_b_copy(c, p0, k0, g.panels, g.kp);
        cp_async4(b_stage(s) + cp.dst, g.w + cp.src, cp.valid);
      }
    }
    cp_async_commit();
  };

#pragma unroll
  for (int i = 0; i < S - 2; ++i) load_step(i);
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  for (int64_t i = 0; i < steps; ++i) {
    cp_async_wait<S - 3>();  // step i's copies (this thread's) have landed
    fence_proxy_async();     // ... and are visible to the tensor cores' reads
    __syncthreads();         // every thread's; and every warpgroup's wgmma of step i - 2 are done (awaited below)
    load_step(i + S - 2);    // refills step i - 2's stage (step i - 1's wgmma may still be reading theirs)
    const int s = static_cast<int>(i % S);
    const uint32_t a_addr = smem_base + s * WgTile::kAStageBytes + wg_smem(wg * WgTile::kWgM, 0);
    const uint32_t b_addr = smem_base + S * WgTile::kAStageBytes + s * WgTile::kBStageBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / WgTile::kWgK; ++kk) {
      wgmma_m64n256k32_u8s8(acc, wg_desc(a_addr + wg_smem(0, kk * WgTile::kWgK)),
                            wg_desc(b_addr + wg_smem(0, kk * WgTile::kWgK)));
    }
    wgmma_commit();
    wgmma_wait<1>();  // step i - 1's wgmma are done; step i's run on while the next step is issued
  }
  wgmma_wait<0>();
  cp_async_wait<0>();
  __syncthreads();  // the stages are free: the epilogue stages the accumulators there

  // The epilogue, 64 columns at a time: each warpgroup writes its 64 x 64 accumulators of the chunk into shared
  // memory, then its threads take the outputs row by row (coalesced global traffic, and a loop instead of 128
  // unrolled epilogues). With split-K every split publishes its sums this way; the tile's last block to arrive
  // then adds all of them, from global memory, and runs the epilogue.
  int32_t* tile = reinterpret_cast<int32_t*>(smem) + wg * WgTile::kWgM * kWgEpilogueLd;
  const int64_t z = blockIdx.z;
  auto bar_wg = [&] { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); };  // this warpgroup only
  auto stage_chunk = [&](auto chunk) {  // acc columns [64 c, 64 c + 64) of this thread into the tile
    constexpr int c = decltype(chunk)::value;
#pragma unroll
    for (int j = 0; j < WgTile::kAcc / 4; ++j) {
      const int i = c * (WgTile::kAcc / 4) + j;
      tile[wg_d_row(wtid, i) * kWgEpilogueLd + wg_d_col(wtid, i) - 64 * c] = acc[i];
    }
  };
  auto each_chunk = [&](auto&& f) {  // f(c, local row, local col, value) for the tile's outputs inside y
    auto run = [&](auto chunk) {
      constexpr int c = decltype(chunk)::value;
      bar_wg();  // the previous chunk's reads are done
      stage_chunk(chunk);
      bar_wg();
      for (int e = wtid; e < WgTile::kWgM * 64; e += 128) {
        const int r = e / 64, cc = e % 64;
        const int64_t row = m0 + wg * WgTile::kWgM + r, col = n0 + 64 * c + cc;
        if (row < g.m && col < g.n) f(row, col, tile[r * kWgEpilogueLd + cc]);
      }
    };
    run(std::integral_constant<int, 0>{});
    run(std::integral_constant<int, 1>{});
    run(std::integral_constant<int, 2>{});
    run(std::integral_constant<int, 3>{});
  };
  if (g.splits <= 1) {
    each_chunk([&](int64_t row, int64_t col, int32_t v) { g.out.store<OutT>(v, row, col); });
    return;
  }
  each_chunk([&](int64_t row, int64_t col, int32_t v) { g.partial[(z * g.m + row) * g.n + col] = v; });
  if (!split_k_arrive(g)) return;
  for (int e = tid; e < WgTile::kBM * WgTile::kBN; e += WgTile::kThreads) {
    const int64_t row = m0 + e / WgTile::kBN, col = n0 + e % WgTile::kBN;
    if (row >= g.m || col >= g.n) continue;
    uint32_t sum = 0;  // wrapping, as the CPU's int32 sums; the exact total fits
    for (int64_t sp = 0; sp < g.splits; ++sp) sum += static_cast<uint32_t>(__ldcg(g.partial + (sp * g.m + row) * g.n + col));
    g.out.store<OutT>(static_cast<int32_t>(sum), row, col);
  }
#else
  __trap();  // launched only on compute capability 9.0 with the sm_90a code (linear())
#endif
}

template <typename T>
std::string launch(const LinearArgs& a, const Plan& p) {
  const cudaError_t attr = cudaFuncSetAttribute(q8_gemm_wgmma<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                WgTile::kSmemBytes);
  if (attr != cudaSuccess) {
    cudaGetLastError();
    return std::string("q8_gemm_wgmma: cannot allow ") + std::to_string(WgTile::kSmemBytes) +
           " bytes of shared memory: " + cudaGetErrorString(attr);
  }
  const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y), static_cast<unsigned>(p.splits));
  q8_gemm_wgmma<T><<<grid, WgTile::kThreads, WgTile::kSmemBytes, reinterpret_cast<cudaStream_t>(a.stream)>>>(
      gemm_args(a, p));
  return launch_error("q8_gemm_wgmma");
}

}  // namespace

std::string wgmma_gemm(const LinearArgs& a, const Plan& p) {
  return with_dtype(a.dtype, [&](auto t) { return launch<decltype(t)>(a, p); });
}

}  // namespace q8cuda
}  // namespace pycompress
