// How the kernels run on several threads.
//
// Two backends behind one parallel_for:
//   openmp  the OpenMP runtime already loaded in the process (PyTorch's bundled
//           libgomp), found at run time with dl_iterate_phdr and entered through
//           its GOMP_parallel ABI. The kernels then run on the same worker
//           threads as torch's own ops. A second, separate set of threads does
//           not scale on a small machine: after every torch op the OpenMP
//           workers keep spinning and take the cores our own workers need
//           (measured on all-MiniLM-L6-v2 at 2 threads: our int8 layers got no
//           speedup from the second thread until they shared torch's team).
//           Nothing is linked against an OpenMP library, so no second runtime
//           can ever be loaded by pycompress.
//   pool    a small persistent pool of our own, used when no OpenMP runtime is
//           loaded (pycompress used without torch's OpenMP build) or when
//           PYCOMPRESS_THREADING=pool. Each caller works on its own job and only
//           borrows idle workers, so concurrent callers never deadlock.
// Both honour the thread count passed on every call (the Python layer passes
// torch.get_num_threads()) and are safe to call from many threads at once.
#pragma once

#include <cstdint>

namespace pycompress {

using TaskFn = void (*)(void* ctx, int64_t task);

// Runs fn(ctx, t) for t in [0, ntasks), using at most nthreads threads
// including the calling thread. On the openmp backend each thread runs a
// contiguous share of the tasks first (the same share on every call), then
// takes tasks left in the others' shares; the pool hands tasks out in turn.
void parallel_for_raw(int64_t ntasks, int nthreads, TaskFn fn, void* ctx);

template <typename F>
void parallel_for(int64_t ntasks, int nthreads, const F& f) {
  if (ntasks <= 0) return;
  if (nthreads <= 1 || ntasks == 1) {
    for (int64_t t = 0; t < ntasks; ++t) f(t);
    return;
  }
  parallel_for_raw(
      ntasks, nthreads,
      [](void* ctx, int64_t t) { (*static_cast<const F*>(ctx))(t); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

// Threads worth using for `work` units when each thread should get at least
// `min_work_per_thread` (below that, waking a helper costs more than it saves):
// between 1 and `requested`.
inline int threads_for_work(int requested, int64_t work, int64_t min_work_per_thread) {
  const int64_t useful = work / min_work_per_thread;
  if (useful <= 1 || requested <= 1) return 1;
  return useful < requested ? static_cast<int>(useful) : requested;
}

// Number of pool workers started so far (for build_info and tests).
int thread_pool_workers();

// "openmp (<library path>)" or "pool": the backend parallel_for uses.
// Chosen once from PYCOMPRESS_THREADING=auto|openmp|pool (default auto: openmp
// when a runtime is loaded); openmp without a loaded runtime throws.
const char* threading_backend();

}  // namespace pycompress
