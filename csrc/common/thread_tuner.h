// How many threads a small call should use, learned from the calls themselves.
//
// Whether a second thread pays for a call of a few microseconds depends on
// things no size threshold can know: how far apart the host has put the
// cores, and whether the team is awake. Measured on the 2-vCPU KVM machine of
// bench/README.md, one process after another: a (1, 768, 768) int8 GEMV takes
// 6.8 us on one thread and either 5.0 or 8.5 us on two, depending on whether
// the two vCPUs ran close together (a cache line crosses in ~25 ns) or far
// apart (~180 ns); the host moves them while a process runs.
//
// A ThreadTuner belongs to one repeated call (a layer's native plan). Inside
// a band of work sizes it times the calls on one thread and on the team, keeps
// the faster, and times the other choice again every kReprobe calls, so it
// follows the machine when the placement changes. Outside the band the choice
// is fixed: one thread below kMinWorkPerThread per thread, the team at or
// above kSureWorkPerThread per thread (there a second thread wins even when the
// cores are far apart). The outputs never depend on the choice (every kernel
// computes each output element on one thread, in the same order), so
// concurrent callers may race on the estimates: that only shifts a timing.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#include "common/thread_pool.h"

namespace pycompress {

class ThreadTuner {
 public:
  // Units of work (multiply-adds) per thread that bound the tuned band.
  static constexpr int64_t kMinWorkPerThread = int64_t{1} << 17;
  static constexpr int64_t kSureWorkPerThread = int64_t{1} << 21;
  // Calls between two timings of the choice not taken.
  static constexpr uint32_t kReprobe = 32;

  struct Choice {
    int threads;  // threads for this call
    int slot;     // -1: not timed; 0: one thread; 1: the team
  };

  // The choice for one call of `work` units that may use `requested` threads.
  // Without a tuner (nullptr), `fallback_per_thread` units per thread decide.
  static Choice choose(ThreadTuner* tuner, int requested, int64_t work, int64_t fallback_per_thread) {
    const int team = threads_for_work(requested, work, kMinWorkPerThread);
    if (team <= 1) return {1, -1};
    if (work >= team * kSureWorkPerThread) return {team, -1};
    if (tuner == nullptr) return {threads_for_work(requested, work, fallback_per_thread), -1};
    return tuner->pick(team);
  }

  // Records how long a call made with `c` took (nothing for untimed choices).
  void record(const Choice& c, std::chrono::steady_clock::duration elapsed) {
    if (c.slot < 0) return;
    if (team_.load(std::memory_order_relaxed) != c.threads && c.slot == 1) return;  // team changed meanwhile
    const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count();
    const int64_t sample = ns > 0 ? ns : 1;
    std::atomic<int64_t>& est = estimate_ns_[c.slot];
    const int64_t old = est.load(std::memory_order_relaxed);
    if (old == 0) {
      est.store(sample, std::memory_order_relaxed);
      return;
    }
    // A moving average over ~4 timings; one timing counts at most twice the
    // estimate, so a call that was preempted cannot flip the choice alone.
    const int64_t capped = sample < 2 * old ? sample : 2 * old;
    est.store((3 * old + capped) / 4, std::memory_order_relaxed);
  }

  // Current estimates in ns per call (0: not timed yet): one thread, team.
  int64_t estimate_ns(int slot) const { return estimate_ns_[slot].load(std::memory_order_relaxed); }
  int team() const { return team_.load(std::memory_order_relaxed); }

 private:
  Choice pick(int team) {
    if (team_.load(std::memory_order_relaxed) != team) {
      // A new thread count (torch.set_num_threads): the team's timings no longer apply.
      team_.store(team, std::memory_order_relaxed);
      estimate_ns_[1].store(0, std::memory_order_relaxed);
      warmup_.store(0, std::memory_order_relaxed);
    }
    // The first call of each choice only warms it up (weights into cache,
    // the team's threads started): its timing is thrown away.
    const uint32_t w = warmup_.load(std::memory_order_relaxed);
    if (w < 2) {
      warmup_.store(w + 1, std::memory_order_relaxed);
      return w == 0 ? Choice{1, -1} : Choice{team, -1};
    }
    const int64_t one = estimate_ns_[0].load(std::memory_order_relaxed);
    const int64_t many = estimate_ns_[1].load(std::memory_order_relaxed);
    if (one == 0) return {1, 0};
    if (many == 0) return {team, 1};
    const bool team_faster = many < one;
    const uint32_t n = calls_.fetch_add(1, std::memory_order_relaxed);
    const bool probe = n % kReprobe == kReprobe - 1;
    return team_faster != probe ? Choice{team, 1} : Choice{1, 0};
  }

  std::atomic<int64_t> estimate_ns_[2] = {0, 0};
  std::atomic<uint32_t> calls_{0};
  std::atomic<uint32_t> warmup_{0};
  std::atomic<int> team_{0};
};

}  // namespace pycompress
