// Throughput peaks of this CPU's multiply-add units, for "fraction of peak" in
// bench/. Benchmark-only: compiled by bench/machine.py at bench time, never part
// of the package build.
//
// Each kernel runs kChains independent accumulator chains, so the loop is
// limited by issue throughput, not by instruction latency (vpdpbusd and FMA
// have a latency of 4-5 cycles on Zen 4/5 and Intel; 16 chains (12 for AVX2)
// hide it at 2 or more instructions per cycle). Every thread runs the same loop on its own
// registers: no memory traffic at all.
//
// Counting: ops = 2 x multiply-adds (a MAC is a multiply and an add), the
// convention of GOPS = 2*M*N*K / time in the GEMM tables.
//   vpdpbusd zmm : 16 lanes x 4 u8*s8 products = 64 MACs      (AVX-512 VNNI)
//   vpmaddwd ymm + vpaddd ymm : 8 lanes x 2 s16*s16 = 16 MACs (the exact AVX2
//                  int8 path: operands widened to int16, pairs summed to int32)
//   vfmadd zmm   : 16 fp32 FMAs = 16 MACs
//
// Usage: vnni_peak <kernel> <threads> <seconds>
//   kernel: vpdpbusd_zmm | vpmaddwd_ymm | fma_zmm
// Prints one line: <kernel> <threads> <GOPS> (best of 5 timed repeats).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int kChains = 16;

// The result of each chain is folded into a sink so the compiler cannot drop the loop.
std::atomic<int64_t> g_sink{0};

__attribute__((target("avx512f,avx512vnni"))) double run_vpdpbusd_zmm(int64_t iters) {
  __m512i acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_epi32(c);
  __m512i a = _mm512_set1_epi8(3);
  __m512i b = _mm512_set1_epi8(-5);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbusd_epi32(acc[c], a, b);
  }
  __m512i sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm512_add_epi32(sum, acc[c]);
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, sum);
  int64_t s = 0;
  for (int32_t v : lanes) s += v;
  g_sink += s;
  return static_cast<double>(iters) * kChains * 64 * 2;
}

// AVX2 has 16 ymm registers: 12 chains + the constant operand fit without spills.
// Each chain multiplies its own accumulator (so no two vpmaddwd share operands
// and none can be merged or hoisted) and adds the pair sums back.
constexpr int kChainsAvx2 = 12;

__attribute__((target("avx2"))) double run_vpmaddwd_ymm(int64_t iters) {
  __m256i acc[kChainsAvx2];
  for (int c = 0; c < kChainsAvx2; ++c) acc[c] = _mm256_set1_epi32(c);
  const __m256i b = _mm256_set1_epi16(-5);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChainsAvx2; ++c) acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(acc[c], b));
  }
  __m256i sum = acc[0];
  for (int c = 1; c < kChainsAvx2; ++c) sum = _mm256_add_epi32(sum, acc[c]);
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
  int64_t s = 0;
  for (int32_t v : lanes) s += v;
  g_sink += s;
  return static_cast<double>(iters) * kChainsAvx2 * 16 * 2;
}

__attribute__((target("avx512f,fma"))) double run_fma_zmm(int64_t iters) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c));
  const __m512 a = _mm512_set1_ps(0.999f);
  const __m512 b = _mm512_set1_ps(1e-3f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  }
  __m512 sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[c]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sum);
  float s = 0.0f;
  for (float v : lanes) s += v;
  g_sink += static_cast<int64_t>(s);
  return static_cast<double>(iters) * kChains * 16 * 2;
}

using Kernel = double (*)(int64_t);  // runs `iters` iterations, returns the ops done

// `threads` threads each run `iters` iterations from a common start; returns GOPS
// over the wall time of the slowest.
double timed_gops(Kernel kernel, int threads, int64_t iters) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<double> ops(threads, 0.0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      ops[t] = kernel(iters);
    });
  }
  while (ready.load() < threads) {
  }
  const auto start = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  for (auto& th : pool) th.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double total = 0.0;
  for (double o : ops) total += o;
  return total / seconds * 1e-9;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s vpdpbusd_zmm|vpmaddwd_ymm|fma_zmm <threads> <seconds>\n", argv[0]);
    return 2;
  }
  const std::string name = argv[1];
  const int threads = std::atoi(argv[2]);
  const double seconds = std::atof(argv[3]);
  Kernel kernel = nullptr;
  if (name == "vpdpbusd_zmm") {
    kernel = run_vpdpbusd_zmm;
  } else if (name == "vpmaddwd_ymm") {
    kernel = run_vpmaddwd_ymm;
  } else if (name == "fma_zmm") {
    kernel = run_fma_zmm;
  }
  if (kernel == nullptr || threads < 1 || !(seconds > 0.0)) {
    std::fprintf(stderr, "vnni_peak: bad arguments (kernel %s, threads %d, seconds %g)\n", name.c_str(), threads,
                 seconds);
    return 2;
  }
  // Calibrate on one thread (this also wakes the vector units up), then size
  // each of the 5 repeats to seconds / 5.
  int64_t iters = 1 << 16;
  double gops = timed_gops(kernel, 1, iters);
  const double ops_per_iter = kernel(1);
  iters = std::max<int64_t>(1 << 16, static_cast<int64_t>(seconds / 5 * gops * 1e9 / ops_per_iter));
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) best = std::max(best, timed_gops(kernel, threads, iters));
  std::printf("%s %d %.1f\n", name.c_str(), threads, best);
  return g_sink.load() == 42 ? 1 : 0;  // reads the sink; never 42 in practice
}
