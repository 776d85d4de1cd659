// A small persistent thread pool for the kernels.
//
// Why not OpenMP: PyTorch ships its own libgomp; a second OpenMP runtime in the
// same process gives two sets of spinning threads fighting over the cores. This
// pool is torch-free, honours the thread count passed by the caller on every
// call (the Python layer passes torch.get_num_threads()), and is safe to call
// from many threads at once: each caller works on its own job and only borrows
// idle workers, so concurrent callers never deadlock or share state.
#pragma once

#include <cstdint>

namespace pycompress {

using TaskFn = void (*)(void* ctx, int64_t task);

// Runs fn(ctx, t) for t in [0, ntasks), using at most nthreads threads
// including the calling thread. Tasks are handed out dynamically.
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

// Number of pool workers started so far (for build_info and tests).
int thread_pool_workers();

}  // namespace pycompress
