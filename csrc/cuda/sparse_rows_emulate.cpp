// The sparse CUDA kernels (q8_sparse_rows__sm61.cu, sparse_f32_rows__sm61.cu) run on the CPU, block by block, warp
// by warp and lane by lane, through the kernels' index math (q8_cuda_tiling.h): the plan's grid, each warp's channel
// through the row order, each lane's stride of the channel's blocks or values, every read of the pack and the
// activation rows bounds-checked, the warp's shuffle reduction in its butterfly order, the epilogue. The int8 sums
// are exact (so the dense reference's bits); the float ones are the kernel's float32 operations in the kernel's
// order (std::fma for __fmaf_rn, one rounding each), so the emulation gives the GPU's bits exactly.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/epilogue_math.h"
#include "cuda/q8_cuda_emulate.h"
#include "cuda/q8_cuda_tiling.h"

namespace pycompress {
namespace q8cuda {
namespace {

void check_index(int64_t i, int64_t size, const char* what) {
  if (i < 0 || i >= size)
    throw std::logic_error(std::string("cuda_sparse_emulate: a read of ") + what + " is out of bounds at " +
                           std::to_string(i));
}

// f(channel, m0, rows) for each warp that has a channel, as the grid runs them.
template <class F>
std::string for_each_warp(const EmulateArgs& a, F&& f) {
  SparsePlan p;
  const char* why = nullptr;
  if (!sparse_plan(a.m, a.n, a.k, &p, &why)) return why;
  for (int64_t by = 0; by < p.grid_y; ++by)
    for (int64_t bx = 0; bx < p.grid_x; ++bx)
      for (int w = 0; w < kSparseWarps; ++w) {
        const int64_t slot = bx * kSparseWarps + w;
        if (slot >= a.n) continue;
        const int64_t channel = a.row_order != nullptr ? a.row_order[slot] : slot;
        check_index(channel, a.n, "the row order's channel");
        const int64_t m0 = by * kSparseRows;
        f(channel, m0, sparse_rows_in_pass(a.m, m0));
      }
  return "";
}

}  // namespace

std::string sparse_q8_emulate(const EmulateArgs& a) {
  if (a.m == 0) return for_each_warp(a, [](int64_t, int64_t, int) {});
  const QuantizedRows qr = quantize_rows(a);
  std::vector<int> writes(static_cast<size_t>(a.m * a.n), 0);
  const std::string err = for_each_warp(a, [&](int64_t n, int64_t m0, int rows) {
    uint32_t sum[kSparseRows] = {};  // the warp's reduction of its lanes' exact int32 sums
    for (int lane = 0; lane < 32; ++lane) {
      const int32_t end = a.row_ptr[n + 1];
      for (int32_t j = a.row_ptr[n] + lane; j < end; j += 32) {
        check_index(j, a.stored, "the blocks");
        const int64_t col = 4 * static_cast<int64_t>(a.blk_idx[j]);
        for (int r = 0; r < rows; ++r) {
          const int64_t at = (m0 + r) * qr.ldq + col;
          check_index(at + 3, static_cast<int64_t>(qr.q.size()), "the quantized rows");
          int32_t dot = 0;  // dp4a.u32.s32
          for (int i = 0; i < 4; ++i) dot += static_cast<int32_t>(qr.q[at + i]) * a.values[4 * j + i];
          sum[r] += static_cast<uint32_t>(dot);
        }
      }
    }
    for (int r = 0; r < rows; ++r) {  // lane r writes row m0 + r
      writes[(m0 + r) * a.n + n] += 1;
      store_output(a, qr, static_cast<int32_t>(sum[r]), m0 + r, n);
    }
  });
  if (!err.empty()) return err;
  check_written_once(a, writes);
  return "";
}

std::string sparse_f32_emulate(const EmulateArgs& a) {
  const bool nm24 = a.nm_idx != nullptr;
  if (nm24 && (a.k % 4 != 0 || a.nm_words != (a.k / 2 + 15) / 16)) return "an nm24 pack needs K % 4 == 0";
  std::vector<int> writes(static_cast<size_t>(a.m * a.n), 0);
  const std::string err = for_each_warp(a, [&](int64_t n, int64_t m0, int rows) {
    const int64_t begin = nm24 ? n * (a.k / 2) : a.row_ptr[n];
    const int32_t count = static_cast<int32_t>(nm24 ? a.k / 2 : a.row_ptr[n + 1] - begin);
    float acc[32][kSparseRows] = {};
    for (int lane = 0; lane < 32; ++lane)
      for (int32_t j = lane; j < count; j += 32) {
        check_index(begin + j, a.stored, "the values");
        const float w = a.f32_values[begin + j];
        int64_t col;
        if (nm24) {
          check_index(n * a.nm_words + (j >> 4), a.n * a.nm_words, "the nm24 indices");
          col = nm24_col(a.nm_idx + n * a.nm_words, j);
        } else {
          col = a.blk_idx[begin + j];
        }
        check_index(col, a.k, "a row of x (column)");
        for (int r = 0; r < rows; ++r) acc[lane][r] = std::fma(a.x[(m0 + r) * a.ldx + col], w, acc[lane][r]);
      }
    for (int o = 16; o > 0; o >>= 1) {  // __shfl_xor_sync butterfly: every lane adds its partner's value
      float next[32][kSparseRows] = {};
      for (int lane = 0; lane < 32; ++lane)
        for (int r = 0; r < rows; ++r) next[lane][r] = acc[lane][r] + acc[lane ^ o][r];
      std::memcpy(acc, next, sizeof(acc));
    }
    for (int r = 0; r < rows; ++r) {  // lane r writes row m0 + r
      float v = acc[r][r];
      if (a.bias != nullptr) v = v + a.bias[n];
      writes[(m0 + r) * a.n + n] += 1;
      a.y[(m0 + r) * a.n + n] = apply_activation(v, static_cast<Activation>(a.act));
    }
  });
  if (!err.empty()) return err;
  check_written_once(a, writes);
  return "";
}

}  // namespace q8cuda
}  // namespace pycompress
