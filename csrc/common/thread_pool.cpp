#include "common/thread_pool.h"

#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace pycompress {
namespace {

struct Job {
  TaskFn fn;
  void* ctx;
  int64_t ntasks;
  int max_helpers;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int helpers = 0;  // guarded by Pool::mutex
};

// Workers spin this long after their last task before sleeping: consecutive
// kernel calls (layer after layer) then start without a futex wake-up, which
// costs tens of microseconds in a VM. Short enough not to starve torch's own
// threads between our calls on a 2-core machine.
constexpr auto kSpin = std::chrono::microseconds(50);

class Pool {
 public:
  static Pool& instance() {
    // Leaked on purpose: worker threads must never outlive a destroyed pool at
    // interpreter shutdown.
    static Pool* pool = new Pool();
    return *pool;
  }

  void run(int64_t ntasks, int nthreads, TaskFn fn, void* ctx) {
    Job job;
    job.fn = fn;
    job.ctx = ctx;
    job.ntasks = ntasks;
    job.max_helpers = nthreads - 1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_.size()) < job.max_helpers) {
        workers_.emplace_back([this] { worker_loop(); });
        worker_count_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
      }
      jobs_.push_back(&job);
      pending_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();

    work_on(job);

    {
      // Retire the job so no new helper joins, then wait for the ones inside.
      std::unique_lock<std::mutex> lock(mutex_);
      remove_job(&job);
    }
    while (job.done.load(std::memory_order_acquire) < ntasks) std::this_thread::yield();
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, [&] { return job.helpers == 0; });
  }

  int workers() const { return worker_count_.load(std::memory_order_relaxed); }

 private:
  Pool() = default;

  static void work_on(Job& job) {
    for (;;) {
      const int64_t t = job.next.fetch_add(1, std::memory_order_relaxed);
      if (t >= job.ntasks) return;
      job.fn(job.ctx, t);
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  void remove_job(Job* job) {
    for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
      if (*it == job) {
        jobs_.erase(it);
        pending_.fetch_sub(1, std::memory_order_release);
        return;
      }
    }
  }

  // Picks a job that still has tasks and helper slots. Caller holds mutex_.
  Job* claim_job() {
    for (Job* job : jobs_) {
      if (job->helpers < job->max_helpers &&
          job->next.load(std::memory_order_relaxed) < job->ntasks) {
        ++job->helpers;
        return job;
      }
    }
    return nullptr;
  }

  void worker_loop() {
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + kSpin;
      while (pending_.load(std::memory_order_acquire) == 0 &&
             std::chrono::steady_clock::now() < spin_until) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        job = claim_job();
        if (job == nullptr) {
          cv_.wait(lock, [&] { return (job = claim_job()) != nullptr; });
        }
      }
      work_on(*job);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --job->helpers;
      }
      done_cv_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  std::deque<Job*> jobs_;
  std::atomic<int> pending_{0};
  std::atomic<int> worker_count_{0};
  std::vector<std::thread> workers_;
};


// ---- the shared OpenMP runtime -------------------------------------------

using GompParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpThreadNumFn = int (*)();

struct OpenMpRuntime {
  GompParallelFn parallel = nullptr;
  OmpThreadNumFn thread_num = nullptr;
  std::string path;
};

int find_openmp_library(struct dl_phdr_info* info, size_t, void* out) {
  const char* name = info->dlpi_name;
  if (name == nullptr || *name == '\0') return 0;
  const char* base = std::strrchr(name, '/');
  base = base ? base + 1 : name;
  // GNU libgomp, and LLVM / Intel runtimes, which export the GOMP ABI too.
  if (std::strncmp(base, "libgomp", 7) != 0 && std::strncmp(base, "libomp", 6) != 0 &&
      std::strncmp(base, "libiomp5", 8) != 0) {
    return 0;
  }
  void* handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
  if (handle == nullptr) return 0;
  auto* fn = reinterpret_cast<GompParallelFn>(dlsym(handle, "GOMP_parallel"));
  auto* thread_num = reinterpret_cast<OmpThreadNumFn>(dlsym(handle, "omp_get_thread_num"));
  dlclose(handle);  // RTLD_NOLOAD took a reference; the library stays loaded by its owner
  if (fn == nullptr || thread_num == nullptr) return 0;
  auto* rt = static_cast<OpenMpRuntime*>(out);
  rt->parallel = fn;
  rt->thread_num = thread_num;
  rt->path = name;
  return 1;
}

struct Backend {
  OpenMpRuntime openmp;  // parallel == nullptr: use the pool
  std::string description;
};

const Backend& backend() {
  static const Backend b = [] {
    Backend chosen;
    const char* env = std::getenv("PYCOMPRESS_THREADING");
    const std::string mode = env && *env ? env : "auto";
    if (mode != "auto" && mode != "openmp" && mode != "pool") {
      throw std::invalid_argument("PYCOMPRESS_THREADING='" + mode + "': expected auto, openmp or pool");
    }
    if (mode != "pool") dl_iterate_phdr(find_openmp_library, &chosen.openmp);
    if (mode == "openmp" && chosen.openmp.parallel == nullptr) {
      throw std::invalid_argument("PYCOMPRESS_THREADING=openmp but no OpenMP runtime is loaded (import torch first)");
    }
    chosen.description = chosen.openmp.parallel ? "openmp (" + chosen.openmp.path + ")" : "pool";
    return chosen;
  }();
  return b;
}

// Each team thread owns a contiguous range of the tasks and runs it first;
// a thread whose range is done takes tasks from the other ranges, so a late or
// descheduled thread delays nobody but its own current task. A thread thus
// works on the same tasks call after call, and a layer's weights stay in the
// caches of the core that reads them: a (1, 4096, 4096) int8 GEMV on 2 threads
// (16 MiB of weights, L3-resident) took 115 us instead of 134-138 with one
// shared counter handing out tasks in turn (bench/README.md, 2026-11-25),
// and when the host puts the two vCPUs on different L3s, each half stays in
// its own. Each range's counter sits on a cache line of its own, so taking a
// task is an uncontended atomic on a line the owner already holds.
// No initializers: a job sets only the ranges of its team.
struct alignas(64) TaskRange {
  std::atomic<int64_t> next;
  int64_t end;
};

constexpr int kMaxRanges = 64;  // larger teams share a single counter

struct OpenMpJob {
  TaskFn fn;
  void* ctx;
  int64_t ntasks;
  int ranges;  // 0: one shared counter, range[0]
  OmpThreadNumFn thread_num;
  TaskRange range[kMaxRanges];
};

inline void run_from(const OpenMpJob& job, TaskRange& r) {
  for (;;) {
    // A load first: once a range is drained, thieves stop writing its line.
    if (r.next.load(std::memory_order_relaxed) >= r.end) return;
    const int64_t t = r.next.fetch_add(1, std::memory_order_relaxed);
    if (t >= r.end) return;
    job.fn(job.ctx, t);
  }
}

// Body of the parallel region: every team thread, the caller included, runs
// its own range, then helps with the others' (a team smaller than asked for,
// as in a nested region, still runs every range).
void openmp_body(void* data) {
  auto& job = *static_cast<OpenMpJob*>(data);
  if (job.ranges == 0) {
    run_from(job, job.range[0]);
    return;
  }
  const int me = job.thread_num() % job.ranges;
  for (int i = 0; i < job.ranges; ++i) run_from(job, job.range[(me + i) % job.ranges]);
}

}  // namespace

void parallel_for_raw(int64_t ntasks, int nthreads, TaskFn fn, void* ctx) {
  const Backend& b = backend();
  if (b.openmp.parallel != nullptr) {
    const int64_t team = nthreads < ntasks ? nthreads : ntasks;
    OpenMpJob job;
    job.fn = fn;
    job.ctx = ctx;
    job.ntasks = ntasks;
    job.thread_num = b.openmp.thread_num;
    if (team <= kMaxRanges) {
      job.ranges = static_cast<int>(team);
      for (int64_t i = 0; i < team; ++i) {
        job.range[i].next.store(ntasks * i / team, std::memory_order_relaxed);
        job.range[i].end = ntasks * (i + 1) / team;
      }
    } else {
      job.ranges = 0;
      job.range[0].next.store(0, std::memory_order_relaxed);
      job.range[0].end = ntasks;
    }
    b.openmp.parallel(openmp_body, &job, static_cast<unsigned>(team), 0);
    return;
  }
  Pool::instance().run(ntasks, nthreads, fn, ctx);
}

const char* threading_backend() { return backend().description.c_str(); }


int thread_pool_workers() { return Pool::instance().workers(); }

}  // namespace pycompress
