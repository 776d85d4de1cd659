// Throughput ceilings of this CPU, for "fraction of the ceiling" in bench/:
// the multiply-add units (int8 and fp32) and a plain read loop's bandwidth.
// Benchmark-only: compiled by bench/machine.py at bench time, never part of the
// package build.
//
// Multiply kernels: each runs independent accumulator chains (16 on zmm, 12 on
// ymm, whose VEX forms have only 16 registers), so the loop is limited by issue
// throughput, not by instruction latency (vpdpbusd and FMA have a latency of 4-5
// cycles on Zen 4/5 and Intel; 12 chains hide it at 2 instructions per cycle).
// Every thread runs the same loop on its own registers: no memory traffic. Each
// chain feeds its own accumulator back as an operand, so no two multiplies share
// operands and none can be merged or hoisted out of the loop. The loops are
// inline assembly (see PEAK_REP12 below for why).
//
// Counting: ops = 2 x multiply-adds (a MAC is a multiply and an add), the
// convention of GOPS = 2*M*N*K / time in the GEMM tables. A MAC is one int8 (or
// fp32) product that the result uses; helper instructions count for nothing.
//   vpdpbusd_zmm   : 16 lanes x 4 u8*s8 products = 64 MACs (AVX-512 VNNI)
//   vpdpbusd_ymm   : 8 lanes x 4 u8*s8 = 32 MACs (AVX-VNNI, VEX-encoded; run only
//                    when CPUID.(EAX=7,ECX=1):EAX[4] says the CPU has it)
//   vpmaddwd_ymm   : vpmaddwd + vpaddd, 8 lanes x 2 s16*s16 = 16 MACs (the exact
//                    AVX2 int8 path: operands widened to int16, pairs summed to int32)
//   vpmaddubsw_ymm : vpmaddubsw + vpmaddwd(ones) + vpaddd, 32 u8*s8 products = 32
//                    MACs (the AVX2 way FBGEMM and ONNX Runtime use: pairs summed in
//                    int16, which saturates unless activations are <= 127, "u7")
//   fma_zmm, fma_ymm : 16 / 8 fp32 FMAs = 16 / 8 MACs
//   tdpbusd        : AMX, 16 x 16 int32 sums of 64 u8*s8 products = 16384 MACs, four
//                    independent accumulator tiles (tmm0-3) from two A and two B
//                    tiles (Linux grants the tile state on request: arch_prctl)
//
// Read loop: read_ymm streams a buffer of <bytes> with plain 32-byte loads
// summed into 4 accumulators (no multiplies), the bandwidth a GEMV that only
// reads its weights once per call could reach. The buffer is split between the
// threads, each reading its own contiguous share (as a GEMV's threads read their
// share of the weights), first touched by that thread. Reported in GB/s (1e9
// bytes per second, all threads together).
//
// Usage: vnni_peak <kernel> <threads> <seconds> [bytes]
//   kernel: vpdpbusd_zmm | vpdpbusd_ymm | vpmaddwd_ymm | vpmaddubsw_ymm | fma_zmm |
//           fma_ymm | tdpbusd | read_ymm (needs bytes)
// Prints one line: <kernel> <threads> <GOPS or GB/s> (best of 5 timed repeats), or
// "<kernel> unsupported" with exit status 3 when this CPU lacks the instructions.
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int kChains = 16;
// ymm kernels: 16 registers in VEX encoding, 12 chains + the constant operands
// fit without spills.
constexpr int kChainsYmm = 12;

// Each kernel's loop is inline assembly over registers. Written as plain C++
// (as this file was until the u7 and AVX-VNNI kernels came), GCC 12 -O2 stored
// most of the ymm chains to the stack on every iteration (spill code around
// rotating registers) and the loop was store-bound: on Zen 5, vpmaddwd_ymm 95
// GOPS a core against 204 in registers, vpdpbusd_ymm 268 against 467. The zmm
// kernels lost little (2 stores per 16 instructions).
#define PEAK_REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define PEAK_REP16(X) PEAK_REP12(X) X(12) X(13) X(14) X(15)
#define PEAK_LIST12(X) X(0), X(1), X(2), X(3), X(4), X(5), X(6), X(7), X(8), X(9), X(10), X(11)
// asm operands of the ymm kernels: accumulators read and written in registers
// ("x": ymm0-15, VEX-encodable).
#define ACC_X(c) [acc##c] "+x"(acc##c)
#define ASM_LOOP(body) "1:\n\t" body "dec %[n]\n\tjnz 1b\n\t"

// The result of each chain is folded into a sink so the compiler cannot drop the loop.
std::atomic<int64_t> g_sink{0};

__attribute__((target("avx2"))) void sink_ymm(__m256i sum) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
  int64_t s = 0;
  for (int32_t v : lanes) s += v;
  g_sink += s;
}

__attribute__((target("avx2"))) void sink_ymm_ps(__m256 sum) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float s = 0.0f;
  for (float v : lanes) s += v;
  g_sink += static_cast<int64_t>(s);
}

// zmm kernels: 16 chains + 2 operands; as "+v" operands they would exceed
// asm's 30-operand limit, so these name their registers: zmm0-15 the chains,
// zmm16-17 the operands, loaded from and stored to memory around the loop.
#define ZMM_LOAD(c) "vmovdqu64 " #c "*64(%[acc]), %%zmm" #c "\n\t"
#define ZMM_STORE(c) "vmovdqu64 %%zmm" #c ", " #c "*64(%[acc])\n\t"
#define ZMM_CLOBBERS                                                                                            \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", \
      "xmm13", "xmm14", "xmm15", "xmm16", "xmm17"

__attribute__((target("avx512f,avx512vnni"))) double run_vpdpbusd_zmm(int64_t iters) {
  alignas(64) int32_t acc[kChains][16];
  for (int c = 0; c < kChains; ++c) std::fill(acc[c], acc[c] + 16, c);
  const __m512i a = _mm512_set1_epi8(3);
  const __m512i b = _mm512_set1_epi8(-5);
#define STEP(c) "vpdpbusd %%zmm17, %%zmm16, %%zmm" #c "\n\t"
  if (int64_t n = iters; n > 0) {
    asm volatile(PEAK_REP16(ZMM_LOAD) "vmovdqu64 %[a], %%zmm16\n\tvmovdqu64 %[b], %%zmm17\n\t" ASM_LOOP(
                     PEAK_REP16(STEP)) PEAK_REP16(ZMM_STORE)
                 : [n] "+r"(n)
                 : [acc] "r"(acc), [a] "m"(a), [b] "m"(b)
                 : "memory", "cc", ZMM_CLOBBERS);
  }
#undef STEP
  int64_t s = 0;
  for (int c = 0; c < kChains; ++c) {
    for (int32_t v : acc[c]) s += v;
  }
  g_sink += s;
  return static_cast<double>(iters) * kChains * 64 * 2;
}

// AVX-VNNI: the VEX form of vpdpbusd on ymm (Alder Lake and later, Sierra Forest,
// Zen 5), the form an AVX2-only CPU with AVX-VNNI can run.
__attribute__((target("avx2,avxvnni"))) double run_vpdpbusd_ymm(int64_t iters) {
#define DECL(c) __m256i acc##c = _mm256_set1_epi32(c);
#define STEP(c) "%{vex%} vpdpbusd %[b], %[a], %[acc" #c "]\n\t"
#define SUM(c) sum = _mm256_add_epi32(sum, acc##c);
  PEAK_REP12(DECL)
  const __m256i a = _mm256_set1_epi8(3);
  const __m256i b = _mm256_set1_epi8(-5);
  if (int64_t n = iters; n > 0) {
    asm volatile(ASM_LOOP(PEAK_REP12(STEP)) : PEAK_LIST12(ACC_X), [n] "+r"(n) : [a] "x"(a), [b] "x"(b) : "cc");
  }
  __m256i sum = _mm256_setzero_si256();
  PEAK_REP12(SUM)
#undef DECL
#undef STEP
#undef SUM
  sink_ymm(sum);
  return static_cast<double>(iters) * kChainsYmm * 32 * 2;
}

// Two-instruction steps: each chain's product goes to scratch t0 (even chains)
// or t1 (odd chains), renamed by the core, so the steps stay independent.
#define PAIRS12(STEP) STEP(0, t0) STEP(1, t1) STEP(2, t0) STEP(3, t1) STEP(4, t0) STEP(5, t1) \
  STEP(6, t0) STEP(7, t1) STEP(8, t0) STEP(9, t1) STEP(10, t0) STEP(11, t1)

// The exact AVX2 path: each chain multiplies its own accumulator (as int16
// pairs) and adds the pair sums back.
__attribute__((target("avx2"))) double run_vpmaddwd_ymm(int64_t iters) {
#define DECL(c) __m256i acc##c = _mm256_set1_epi32(c);
#define STEP(c, t) "vpmaddwd %[b], %[acc" #c "], %[" #t "]\n\tvpaddd %[" #t "], %[acc" #c "], %[acc" #c "]\n\t"
#define SUM(c) sum = _mm256_add_epi32(sum, acc##c);
  PEAK_REP12(DECL)
  const __m256i b = _mm256_set1_epi16(-5);
  __m256i t0, t1;
  if (int64_t n = iters; n > 0) {
    asm volatile(ASM_LOOP(PAIRS12(STEP))
                 : PEAK_LIST12(ACC_X), [n] "+r"(n), [t0] "=&x"(t0), [t1] "=&x"(t1)
                 : [b] "x"(b)
                 : "cc");
  }
  __m256i sum = _mm256_setzero_si256();
  PEAK_REP12(SUM)
#undef DECL
#undef STEP
#undef SUM
  sink_ymm(sum);
  return static_cast<double>(iters) * kChainsYmm * 16 * 2;
}

// The u7 path: u8 x s8 pairs summed to int16 (vpmaddubsw; the accumulator's
// bytes are the u8 operand, their values do not change the speed), pairs of
// those summed to int32 (vpmaddwd with ones), added to the accumulator: 32
// products for two multiply-port instructions.
__attribute__((target("avx2"))) double run_vpmaddubsw_ymm(int64_t iters) {
#define DECL(c) __m256i acc##c = _mm256_set1_epi32(c);
#define STEP(c, t)                                                                                  \
  "vpmaddubsw %[b], %[acc" #c "], %[" #t "]\n\tvpmaddwd %[ones], %[" #t "], %[" #t "]\n\t"          \
  "vpaddd %[" #t "], %[acc" #c "], %[acc" #c "]\n\t"
#define SUM(c) sum = _mm256_add_epi32(sum, acc##c);
  PEAK_REP12(DECL)
  const __m256i b = _mm256_set1_epi8(-5);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i t0, t1;
  if (int64_t n = iters; n > 0) {
    asm volatile(ASM_LOOP(PAIRS12(STEP))
                 : PEAK_LIST12(ACC_X), [n] "+r"(n), [t0] "=&x"(t0), [t1] "=&x"(t1)
                 : [b] "x"(b), [ones] "x"(ones)
                 : "cc");
  }
  __m256i sum = _mm256_setzero_si256();
  PEAK_REP12(SUM)
#undef DECL
#undef STEP
#undef SUM
  sink_ymm(sum);
  return static_cast<double>(iters) * kChainsYmm * 32 * 2;
}

__attribute__((target("avx512f,fma"))) double run_fma_zmm(int64_t iters) {
  alignas(64) float acc[kChains][16];
  for (int c = 0; c < kChains; ++c) std::fill(acc[c], acc[c] + 16, static_cast<float>(c));
  const __m512 a = _mm512_set1_ps(0.999f);
  const __m512 b = _mm512_set1_ps(1e-3f);
#define STEP(c) "vfmadd132ps %%zmm16, %%zmm17, %%zmm" #c "\n\t"
  if (int64_t n = iters; n > 0) {
    asm volatile(PEAK_REP16(ZMM_LOAD) "vmovups %[a], %%zmm16\n\tvmovups %[b], %%zmm17\n\t" ASM_LOOP(
                     PEAK_REP16(STEP)) PEAK_REP16(ZMM_STORE)
                 : [n] "+r"(n)
                 : [acc] "r"(acc), [a] "m"(a), [b] "m"(b)
                 : "memory", "cc", ZMM_CLOBBERS);
  }
#undef STEP
  float s = 0.0f;
  for (int c = 0; c < kChains; ++c) {
    for (float v : acc[c]) s += v;
  }
  g_sink += static_cast<int64_t>(s);
  return static_cast<double>(iters) * kChains * 16 * 2;
}

__attribute__((target("avx2,fma"))) double run_fma_ymm(int64_t iters) {
#define DECL(c) __m256 acc##c = _mm256_set1_ps(static_cast<float>(c));
#define STEP(c) "vfmadd132ps %[a], %[b], %[acc" #c "]\n\t"
#define SUM(c) sum = _mm256_add_ps(sum, acc##c);
  PEAK_REP12(DECL)
  const __m256 a = _mm256_set1_ps(0.999f);
  const __m256 b = _mm256_set1_ps(1e-3f);
  if (int64_t n = iters; n > 0) {
    asm volatile(ASM_LOOP(PEAK_REP12(STEP)) : PEAK_LIST12(ACC_X), [n] "+r"(n) : [a] "x"(a), [b] "x"(b) : "cc");
  }
  __m256 sum = _mm256_setzero_ps();
  PEAK_REP12(SUM)
#undef DECL
#undef STEP
#undef SUM
  sink_ymm_ps(sum);
  return static_cast<double>(iters) * kChainsYmm * 8 * 2;
}

// `passes` passes of plain 32-byte loads over [p, p + bytes) (bytes a multiple of
// 256); returns the bytes read.
__attribute__((target("avx2"))) double read_ymm(const uint8_t* p, size_t bytes, int64_t passes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t pass = 0; pass < passes; ++pass) {
    for (size_t i = 0; i < bytes; i += 256) {
      const __m256i* v = reinterpret_cast<const __m256i*>(p + i);
      a0 = _mm256_add_epi32(a0, _mm256_load_si256(v + 0));
      a1 = _mm256_add_epi32(a1, _mm256_load_si256(v + 1));
      a2 = _mm256_add_epi32(a2, _mm256_load_si256(v + 2));
      a3 = _mm256_add_epi32(a3, _mm256_load_si256(v + 3));
      a0 = _mm256_add_epi32(a0, _mm256_load_si256(v + 4));
      a1 = _mm256_add_epi32(a1, _mm256_load_si256(v + 5));
      a2 = _mm256_add_epi32(a2, _mm256_load_si256(v + 6));
      a3 = _mm256_add_epi32(a3, _mm256_load_si256(v + 7));
    }
    // Each pass must read the memory again (nothing may be folded across passes).
    asm volatile("" ::: "memory");
  }
  sink_ymm(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)));
  return static_cast<double>(bytes) * static_cast<double>(passes);
}

__attribute__((target("amx-tile,amx-int8"))) double run_tdpbusd(int64_t iters) {
  alignas(64) uint8_t config[64] = {};
  config[0] = 1;  // palette 1; tiles 0-7: 16 rows x 64 bytes
  for (int t = 0; t < 8; ++t) {
    config[16 + 2 * t] = 64;
    config[48 + t] = 16;
  }
  alignas(64) int8_t operand[1024];
  std::fill(operand, operand + 1024, int8_t{3});
  alignas(64) int32_t sums[4][256];
  _tile_loadconfig(config);
  _tile_loadd(4, operand, 64);
  _tile_loadd(5, operand, 64);
  _tile_loadd(6, operand, 64);
  _tile_loadd(7, operand, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  if (int64_t n = iters; n > 0) {
    asm volatile(ASM_LOOP("tdpbusd %%tmm6, %%tmm4, %%tmm0\n\ttdpbusd %%tmm7, %%tmm4, %%tmm1\n\t"
                          "tdpbusd %%tmm6, %%tmm5, %%tmm2\n\ttdpbusd %%tmm7, %%tmm5, %%tmm3\n\t")
                 : [n] "+r"(n)
                 :
                 : "memory", "cc");
  }
  _tile_stored(0, sums[0], 64);
  _tile_stored(1, sums[1], 64);
  _tile_stored(2, sums[2], 64);
  _tile_stored(3, sums[3], 64);
  _tile_release();
  int64_t s = 0;
  for (auto& tile : sums) {
    for (int32_t v : tile) s += v;
  }
  g_sink += s;
  return static_cast<double>(iters) * 4 * 16384 * 2;
}

// AMX needs CPUID's AMX-TILE and AMX-INT8 and the OS's grant of the tile state.
bool has_amx_int8() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (((edx >> 24) & 1u) == 0 || ((edx >> 25) & 1u) == 0) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool has_avx_vnni() {
  // CPUID.(EAX=7, ECX=1):EAX bit 4 = AVX-VNNI.
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
  return ((eax >> 4) & 1u) != 0 && __builtin_cpu_supports("avx2");
}

// Runs `iters` iterations on thread `t`, returns the work done (ops or bytes).
using Kernel = std::function<double(int t, int64_t iters)>;

// `threads` threads each run `iters` iterations from a common start; returns the
// work per second (x 1e-9: GOPS or GB/s) over the wall time of the slowest.
double timed_rate(const Kernel& kernel, int threads, int64_t iters) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<double> work(threads, 0.0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      work[t] = kernel(t, iters);
    });
  }
  while (ready.load() < threads) {
  }
  const auto start = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  for (auto& th : pool) th.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double total = 0.0;
  for (double w : work) total += w;
  return total / seconds * 1e-9;
}

// Calibrates on `threads` threads (this also wakes the vector units
// up), sizes each of 5 repeats to seconds / 5, returns the best rate.
double best_rate(const Kernel& kernel, int threads, double seconds, int64_t first_iters, int64_t min_iters) {
  const double work_per_iter = kernel(0, 1);
  const double rate = timed_rate(kernel, threads, first_iters);
  const int64_t iters =
      std::max<int64_t>(min_iters, static_cast<int64_t>(seconds / 5 * rate * 1e9 / (work_per_iter * threads)));
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) best = std::max(best, timed_rate(kernel, threads, iters));
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::fprintf(stderr,
                 "usage: %s vpdpbusd_zmm|vpdpbusd_ymm|vpmaddwd_ymm|vpmaddubsw_ymm|fma_zmm|fma_ymm|tdpbusd <threads> <seconds>\n"
                 "       %s read_ymm <threads> <seconds> <bytes>\n",
                 argv[0], argv[0]);
    return 2;
  }
  const std::string name = argv[1];
  const int threads = std::atoi(argv[2]);
  const double seconds = std::atof(argv[3]);
  if (threads < 1 || !(seconds > 0.0)) {
    std::fprintf(stderr, "vnni_peak: bad arguments (threads %d, seconds %g)\n", threads, seconds);
    return 2;
  }
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2");
  const bool avx512 = __builtin_cpu_supports("avx512f");

  if (name == "read_ymm") {
    if (argc != 5) {
      std::fprintf(stderr, "vnni_peak: read_ymm needs <bytes>\n");
      return 2;
    }
    if (!avx2) {
      std::printf("%s unsupported\n", name.c_str());
      return 3;
    }
    // Each thread's share: a multiple of 256 bytes, on its own 4 KiB pages.
    const size_t requested = std::strtoull(argv[4], nullptr, 10);
    const size_t share = std::max<size_t>(4096, requested / threads / 4096 * 4096);
    std::vector<uint8_t*> shares(threads, nullptr);
    {
      std::vector<std::thread> touch;
      for (int t = 0; t < threads; ++t) {
        touch.emplace_back([&, t] {
          shares[t] = static_cast<uint8_t*>(std::aligned_alloc(4096, share));
          if (shares[t] != nullptr) std::memset(shares[t], t + 1, share);  // first touch by its reader
        });
      }
      for (auto& th : touch) th.join();
    }
    for (uint8_t* s : shares) {
      if (s == nullptr) {
        std::fprintf(stderr, "vnni_peak: cannot allocate %zu bytes\n", share);
        return 2;
      }
    }
    const Kernel kernel = [&](int t, int64_t passes) { return read_ymm(shares[t], share, passes); };
    // Calibration: one pass, then repeats of at least 2 passes.
    const double gbs = best_rate(kernel, threads, seconds, 1, 2);
    std::printf("%s %d %.1f\n", name.c_str(), threads, gbs);
    for (uint8_t* s : shares) std::free(s);
    return g_sink.load() == 42 ? 1 : 0;  // reads the sink; never 42 in practice
  }

  double (*compute)(int64_t) = nullptr;
  bool supported = false;
  if (name == "vpdpbusd_zmm") {
    compute = run_vpdpbusd_zmm;
    supported = avx512 && __builtin_cpu_supports("avx512vnni");
  } else if (name == "vpdpbusd_ymm") {
    compute = run_vpdpbusd_ymm;
    supported = has_avx_vnni();
  } else if (name == "vpmaddwd_ymm") {
    compute = run_vpmaddwd_ymm;
    supported = avx2;
  } else if (name == "vpmaddubsw_ymm") {
    compute = run_vpmaddubsw_ymm;
    supported = avx2;
  } else if (name == "fma_zmm") {
    compute = run_fma_zmm;
    supported = avx512 && __builtin_cpu_supports("fma");
  } else if (name == "fma_ymm") {
    compute = run_fma_ymm;
    supported = avx2 && __builtin_cpu_supports("fma");
  } else if (name == "tdpbusd") {
    compute = run_tdpbusd;
    supported = has_amx_int8();
  }
  if (compute == nullptr) {
    std::fprintf(stderr, "vnni_peak: unknown kernel %s\n", name.c_str());
    return 2;
  }
  if (!supported) {
    std::printf("%s unsupported\n", name.c_str());
    return 3;
  }
  const Kernel kernel = [compute](int, int64_t iters) { return compute(iters); };
  const double gops = best_rate(kernel, threads, seconds, 1 << 16, 1 << 16);
  std::printf("%s %d %.1f\n", name.c_str(), threads, gops);
  return g_sink.load() == 42 ? 1 : 0;  // reads the sink; never 42 in practice
}
