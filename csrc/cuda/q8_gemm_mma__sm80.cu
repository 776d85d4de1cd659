// int8 linear on tensor cores (sm_80 and later): per-row activation
// quantization, then mma.sync.m16n8k32 u8 x s8 -> s32 over the CPU's packed
// weights, with the CPU's epilogue in round-to-nearest intrinsics that never
// contract (so y equals the CPU's y bit for bit). Tiling, fragment and staging
// math: q8_cuda_tiling.h (shared with the CPU emulation the tests run).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/q8_cuda.h"
#include "cuda/q8_cuda_device.cuh"
#include "cuda/q8_cuda_tiling.h"

namespace pycompress {
namespace q8cuda {
namespace {

// ---- activation quantization: one warp per row --------------------------------

struct QuantArgs {
  int64_t m, k, ldx, ldq;
  uint8_t* q;
  float* scale;
  int32_t* zp;
  uint8_t* nonfinite;
  bool is_static;
  float static_scale;
  int32_t static_zp, qmax;
  int32_t* counters;  // the GEMM's split-K arrival counters, zeroed here (nullptr: none)
  int64_t n_counters;
};

template <typename T>
__global__ void __launch_bounds__(kQuantRowsPerBlock * 32) quantize_rows(const T* __restrict__ x, QuantArgs a) {
  const int lane = threadIdx.x & 31;
  if (blockIdx.x == 0) {  // the GEMM that follows on the stream counts its splits' arrivals from 0
    for (int64_t i = threadIdx.x; i < a.n_counters; i += blockDim.x) a.counters[i] = 0;
  }
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kQuantRowsPerBlock + (threadIdx.x >> 5);
  if (r >= a.m) return;
  const T* row = x + r * a.ldx;
  // The range includes 0, as on the CPU; min and max are exact, so the order of the reduction does not matter.
  float lo = 0.0f, hi = 0.0f;
  bool finite = true;
  for (int64_t k = lane; k < a.k; k += 32) {
    const float v = to_float(row[k]);
    finite = finite && isfinite(v);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  finite = __all_sync(0xffffffffu, finite);
  const RowQuant rq = row_quant(lo, hi, finite, a.is_static, a.static_scale, a.static_zp, a.qmax);
  uint8_t* q = a.q + r * a.ldq;
  for (int64_t k = lane; k < a.ldq; k += 32) {
    q[k] = (rq.finite && k < a.k) ? quantize_value(to_float(row[k]), rq.inv_scale, rq.zp, a.qmax) : uint8_t{0};
  }
  if (lane == 0) {
    a.scale[r] = rq.scale;
    a.zp[r] = rq.zp;
    a.nonfinite[r] = rq.finite ? 0 : 1;
  }
}

// ---- the GEMM -----------------------------------------------------------------
__device__ __forceinline__ uint32_t lds32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ void mma_u8s8(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <class TileT, typename OutT>
__global__ void __launch_bounds__(TileT::kThreads, 1) q8_gemm(GemmArgs g) {
  extern __shared__ __align__(16) uint8_t smem[];
  constexpr int S = TileT::kStages;
  // Stage s: A at smem + s * kAStageBytes, B after every A stage (pointer arithmetic, not an array of
  // pointers, which would live in local memory).
  auto a_stage = [&](int s) { return smem + s * TileT::kAStageBytes; };
  auto b_stage = [&](int s) { return smem + S * TileT::kAStageBytes + s * TileT::kBStageBytes; };
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = (warp / TileT::kWarpsN) * TileT::kWM, wn = (warp % TileT::kWarpsN) * TileT::kWN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * TileT::kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * TileT::kBN;
  const int64_t p0 = n0 / kPanel;
  // This block's k steps: split blockIdx.z of the plan.
  const int64_t step0 = static_cast<int64_t>(blockIdx.z) * g.steps_per_split;
  const int64_t step1 = min(g.steps, step0 + g.steps_per_split);
  const int64_t steps = step1 - step0;

  int32_t acc[TileT::kMTiles][TileT::kNTiles][4];
#pragma unroll
  for (int i = 0; i < TileT::kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < TileT::kNTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  // Step i of this block into stage i % S; past the last step only an empty group is committed, so that
  // cp.async.wait_group counts the same number of groups on every iteration.
  auto load_step = [&](int64_t i) {
    if (i < steps) {
      const int s = static_cast<int>(i % S);
      const int64_t k0 = (step0 + i) * kBK;
      for (int c = tid; c < TileT::kAChunks; c += TileT::kThreads) {
        const Copy cp = a_copy(c, m0, k0, g.m, g.ldq);
        cp_async16(a_stage(s) + cp.dst, g.q + cp.src, cp.valid);
      }
      for (int c = tid; c < TileT::kBChunks; c += TileT::kThreads) {
        const Copy cp = b_copy(c, p0, k0, g.panels, g.kp);
        cp_async16(b_stage(s) + cp.dst, g.w + cp.src, cp.valid);
      }
    }
    cp_async_commit();
  };

#pragma unroll
  for (int i = 0; i < S - 1; ++i) load_step(i);
  for (int64_t i = 0; i < steps; ++i) {
    cp_async_wait<S - 2>();  // step i's group has landed (at most S - 2 younger ones pending)
    __syncthreads();         // ... for every thread; and every warp is done with step i - 1's stage,
    load_step(i + S - 1);    // which this refills
    const int s = static_cast<int>(i % S);
#pragma unroll
    for (int ks = 0; ks < kBK; ks += kMmaK) {
      uint32_t a[TileT::kMTiles][4], b[TileT::kNTiles][2];
#pragma unroll
      for (int mi = 0; mi < TileT::kMTiles; ++mi)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          a[mi][r] = lds32(a_stage(s) + a_smem(wm + mi * kMmaM + a_frag_row(lane, r), ks + a_frag_k(lane, r)));
#pragma unroll
      for (int j = 0; j < TileT::kNTiles; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          b[j][r] = lds32(b_stage(s) + b_smem(wn + j * kMmaN + b_frag_n(lane), ks + b_frag_k(lane, r)));
#pragma unroll
      for (int mi = 0; mi < TileT::kMTiles; ++mi)
#pragma unroll
        for (int j = 0; j < TileT::kNTiles; ++j) mma_u8s8(acc[mi][j], a[mi], b[j]);
    }
  }
  cp_async_wait<0>();  // no copy outlives the block (the trailing groups are empty)

  // f(accumulator, row, col) for each of this thread's accumulators that lies inside the output.
  auto for_each_output = [&](auto&& f) {
#pragma unroll
    for (int i = 0; i < TileT::kMTiles; ++i)
#pragma unroll
      for (int j = 0; j < TileT::kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t row = m0 + wm + i * kMmaM + c_frag_row(lane, e);
          const int64_t col = n0 + wn + j * kMmaN + c_frag_col(lane, e);
          if (row < g.m && col < g.n) f(acc[i][j][e], row, col);
        }
  };

  if (!split_k_last(g, for_each_output)) return;
  for_each_output([&](int32_t& v, int64_t row, int64_t col) { g.out.store<OutT>(v, row, col); });
}

template <typename T>
std::string launch_quantize(const LinearArgs& a, const Scratch& sl, int64_t n_counters) {
  uint8_t* base = static_cast<uint8_t*>(a.scratch);
  QuantArgs qa{a.m, a.k, a.ldx, q_ld(a.k), base + sl.q, reinterpret_cast<float*>(base + sl.scale),
               reinterpret_cast<int32_t*>(base + sl.zp), base + sl.nonfinite, a.is_static, a.static_scale,
               a.static_zp, a.qmax, reinterpret_cast<int32_t*>(base + sl.counters), n_counters};
  const unsigned blocks = static_cast<unsigned>((a.m + kQuantRowsPerBlock - 1) / kQuantRowsPerBlock);
  quantize_rows<T><<<blocks, kQuantRowsPerBlock * 32, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(
      static_cast<const T*>(a.x), qa);
  return launch_error("q8_quantize_rows");
}

template <typename T>
std::string launch_gemm(const LinearArgs& a, const Plan& p) {
  const GemmArgs g = gemm_args(a, p);
  const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y), static_cast<unsigned>(p.splits));
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (p.tile == TileKind::Small) {
    q8_gemm<SmallTile, T><<<grid, SmallTile::kThreads, SmallTile::kSmemBytes, stream>>>(g);
  } else {
    q8_gemm<LargeTile, T><<<grid, LargeTile::kThreads, LargeTile::kSmemBytes, stream>>>(g);
  }
  return launch_error("q8_gemm");
}

static_assert(SmallTile::kSmemBytes <= 48 * 1024 && LargeTile::kSmemBytes <= 48 * 1024,
              "above 48 KiB of dynamic shared memory a launch needs cudaFuncSetAttribute");

// The checks of quantize() and linear() on the scratch buffer.
std::string check_scratch(const LinearArgs& a, const Scratch& sl) {
  if (a.scratch_size < sl.total) return "scratch buffer too small";
  if (reinterpret_cast<std::uintptr_t>(a.scratch) % kChunk != 0) return "the scratch buffer must be 16-byte aligned";
  if (a.ldx < a.k || a.ldy < a.n) return "row strides below the row lengths";
  return "";
}

}  // namespace

int64_t scratch_bytes(int64_t m, int64_t n, int64_t k, int64_t sms, bool wgmma) {
  Plan p;
  const char* why = nullptr;
  if (!plan(m, n, k, sms, wgmma, &p, &why)) return scratch_layout(m, k).total;  // linear() refuses the call
  return scratch_layout(m, n, p).total;
}

std::string quantize(const LinearArgs& a) {
  const Scratch sl = scratch_layout(a.m, a.k);
  std::string err = check_scratch(a, sl);
  if (!err.empty()) return err;
  return with_dtype(a.dtype, [&](auto t) { return launch_quantize<decltype(t)>(a, sl, 0); });
}

std::string linear(const LinearArgs& a) {
  Plan p;
  const char* why = nullptr;
  if (!plan(a.m, a.n, a.k, a.sms, a.wgmma, &p, &why)) return why;
  if (a.m == 0) return "";
  if (reinterpret_cast<std::uintptr_t>(a.w) % kChunk != 0) return "the packed weights must be 16-byte aligned";
  const Scratch sl = scratch_layout(a.m, a.n, p);
  std::string err = check_scratch(a, sl);
  if (!err.empty()) return err;
  const int64_t n_counters = p.splits > 1 ? p.grid_x * p.grid_y : 0;
  err = with_dtype(a.dtype, [&](auto t) { return launch_quantize<decltype(t)>(a, sl, n_counters); });
  if (!err.empty()) return err;
  if (p.tile == TileKind::Wgmma) return wgmma_gemm(a, p);
  return with_dtype(a.dtype, [&](auto t) { return launch_gemm<decltype(t)>(a, p); });
}

DeviceStatus device_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    return DeviceStatus{-1, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)};
  }
  return DeviceStatus{count, count > 0 ? "" : "no CUDA device"};
}

std::string device_name(int device, int* major, int* minor) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    *major = *minor = -1;
    return "";
  }
  *major = prop.major;
  *minor = prop.minor;
  return prop.name;
}

}  // namespace q8cuda
}  // namespace pycompress
