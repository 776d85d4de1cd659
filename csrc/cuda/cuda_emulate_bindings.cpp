// pybind11 bindings (CPU module _C) of the CUDA kernels' host-side math: the
// launch plan and the CPU emulation of the int8 linear (tests/test_cuda.py).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings_util.h"
#include "cuda/q8_cuda_emulate.h"
#include "cuda/q8_cuda_tiling.h"
#include "cuda/q8_nm24_tiling.h"
#include "cuda/q4_cuda_tiling.h"

namespace py = pybind11;
using namespace pycompress;
using bindings::ptr;

namespace {

// A launch plan as Python sees it (tests, bench/cuda_resources.py).
py::dict plan_dict(const q8cuda::Plan& p, int64_t rows, int64_t n) {
  py::dict d;
  d["tile"] = p.tile == q8cuda::TileKind::Small ? "small" : (p.tile == q8cuda::TileKind::Large ? "large" : "wgmma");
  d["grid"] = py::make_tuple(p.grid_x, p.grid_y);
  d["splits"] = p.splits;
  d["steps"] = p.steps;
  d["steps_per_split"] = p.steps_per_split;
  d["threads"] = p.threads;
  d["smem_bytes"] = p.smem_bytes;
  d["ldq"] = p.ldq;
  d["kp"] = p.kp;
  d["panels"] = p.panels;
  d["scratch_bytes"] = q8cuda::scratch_layout(rows, n, p).total;
  return d;
}

}  // namespace

void register_cuda_emulate_bindings(py::module_& m) {
  m.attr("CUDA_NM24_MAX_ROWS") = q8cuda::kNm24MaxRows;
  m.def(
      "cuda_q8_plan",
      [](int64_t rows, int64_t n, int64_t k, int64_t sms, bool wgmma) {
        q8cuda::Plan p;
        const char* why = nullptr;
        if (!q8cuda::plan(rows, n, k, sms, wgmma, &p, &why)) throw std::invalid_argument(why);
        return plan_dict(p, rows, n);
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("sms") = 0, py::arg("wgmma") = false,
      "the CUDA int8 linear's launch plan on a device of `sms` multiprocessors (0: no split-K) that runs the Hopper "
      "tile or not (wgmma; ValueError when "
      "refused)");
  m.def(
      "cuda_q8_sparse_plan",
      [](int64_t rows, int64_t n, int64_t k) {
        q8cuda::SparsePlan p;
        const char* why = nullptr;
        if (!q8cuda::sparse_plan(rows, n, k, &p, &why)) throw std::invalid_argument(why);
        return py::make_tuple(p.grid_x, p.grid_y);
      },
      py::arg("m"), py::arg("n"), py::arg("k"), "the sparse int8 kernel's grid (ValueError when refused)");
  m.def(
      "cuda_q8_emulate",
      [](std::uintptr_t x, int64_t rows, int64_t k, int64_t ldx, std::uintptr_t w, std::uintptr_t col_sum,
         std::uintptr_t w_scale, std::uintptr_t bias, int64_t n, std::uintptr_t y, std::uintptr_t raw, int act,
         bool is_static, float static_scale, int32_t static_zp, int32_t qmax, int64_t sms, bool wgmma) {
        q8cuda::EmulateArgs a{ptr<const float>(x), rows, k, ldx, ptr<const int8_t>(w), ptr<const int32_t>(col_sum),
                              ptr<const float>(w_scale), ptr<const float>(bias), n, ptr<float>(y), ptr<int32_t>(raw),
                              act, is_static, static_scale, static_zp, qmax, sms, wgmma};
        q8cuda::Plan plan{};
        bindings::run_released([&] { return q8cuda::emulate(a, &plan); });
        return plan_dict(plan, rows, n);
      },
      "y (or raw) = the CUDA int8 linear's algorithm run on the CPU for a device of `sms` multiprocessors (wgmma: "
      "one that runs the Hopper tile); "
      "returns the plan it ran (cuda_q8_plan's dict)");
  m.def(
      "cuda_q4_plan",
      [](int64_t rows, int64_t n, int64_t k, int64_t groups) {
        q8cuda::Q4Plan p;
        const char* why = nullptr;
        if (!q8cuda::q4_plan(rows, n, k, groups, &p, &why)) throw std::invalid_argument(why);
        py::dict d;
        d["grid"] = py::make_tuple(p.grid_x, p.grid_y);
        d["steps"] = p.steps;
        d["steps_per_group"] = p.steps_per_group;
        return d;
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("groups"), "the CUDA W4A8 kernel's plan (ValueError when refused)");
  m.def(
      "cuda_q4_emulate",
      [](std::uintptr_t x, int64_t rows, int64_t k, int64_t ldx, std::uintptr_t w4, std::uintptr_t g_scale,
         std::uintptr_t corr, int64_t groups, std::uintptr_t bias, int64_t n, std::uintptr_t y, int act,
         bool is_static, float static_scale, int32_t static_zp, int32_t qmax) {
        q8cuda::EmulateArgs a{ptr<const float>(x), rows, k, ldx, nullptr, nullptr, nullptr, ptr<const float>(bias), n,
                              ptr<float>(y), nullptr, act, is_static, static_scale, static_zp, qmax, 0};
        a.w4 = ptr<const uint8_t>(w4);
        a.g_scale = ptr<const float>(g_scale);
        a.corr = ptr<const float>(corr);
        a.groups = groups;
        q8cuda::Q4Plan plan{};
        bindings::run_released([&] { return q8cuda::q4_emulate(a, &plan); });
        return py::make_tuple(plan.grid_x, plan.grid_y);
      },
      "y = the CUDA W4A8 linear's algorithm run on the CPU over the CPU's 4-bit pack; returns its grid");
  m.def(
      "cuda_sparse_q8_emulate",
      [](std::uintptr_t x, int64_t rows, int64_t k, int64_t ldx, std::uintptr_t row_ptr, std::uintptr_t blk_idx,
         std::uintptr_t values, int64_t blocks, std::uintptr_t row_order, std::uintptr_t col_sum,
         std::uintptr_t w_scale, std::uintptr_t bias, int64_t n, std::uintptr_t y, int act, bool is_static,
         float static_scale, int32_t static_zp, int32_t qmax) {
        q8cuda::EmulateArgs a{ptr<const float>(x), rows, k, ldx, nullptr, ptr<const int32_t>(col_sum),
                              ptr<const float>(w_scale), ptr<const float>(bias), n, ptr<float>(y), nullptr, act,
                              is_static, static_scale, static_zp, qmax, 0};
        a.row_ptr = ptr<const int32_t>(row_ptr);
        a.blk_idx = ptr<const uint16_t>(blk_idx);
        a.values = ptr<const int8_t>(values);
        a.stored = blocks;
        a.row_order = ptr<const int32_t>(row_order);
        bindings::run_released([&] { return q8cuda::sparse_q8_emulate(a); });
      },
      "y = the CUDA sparse int8 kernel's algorithm run on the CPU over a validated bsr1x4 pack");
  m.def(
      "cuda_sparse_f32_emulate",
      [](std::uintptr_t x, int64_t rows, int64_t k, int64_t ldx, std::uintptr_t row_ptr, std::uintptr_t col_idx,
         std::uintptr_t nm_idx, int64_t nm_words, std::uintptr_t values, int64_t stored, std::uintptr_t row_order,
         std::uintptr_t bias, int64_t n, std::uintptr_t y, int act) {
        q8cuda::EmulateArgs a{ptr<const float>(x), rows, k, ldx, nullptr, nullptr, nullptr, ptr<const float>(bias), n,
                              ptr<float>(y), nullptr, act, false, 1.0f, 0, 255, 0};
        a.row_ptr = ptr<const int32_t>(row_ptr);
        a.blk_idx = ptr<const uint16_t>(col_idx);
        a.nm_idx = ptr<const uint32_t>(nm_idx);
        a.nm_words = nm_words;
        a.f32_values = ptr<const float>(values);
        a.stored = stored;
        a.row_order = ptr<const int32_t>(row_order);
        bindings::run_released([&] { return q8cuda::sparse_f32_emulate(a); });
      },
      "y = the CUDA sparse float kernel's algorithm (csr, or nm24 when nm_idx != 0) run on the CPU, in the "
      "kernel's float32 order");
  m.def(
      "cuda_nm24_bytes", [](int64_t n, int64_t k) { return q8cuda::nm24_layout(n, k).total; }, py::arg("n"),
      py::arg("k"), "bytes of the 2:4 GPU pack of an (n x k) int8 layer (q8_nm24_tiling.h)");
  m.def(
      "cuda_nm24_pack",
      [](std::uintptr_t w, int64_t n, int64_t k, std::uintptr_t out) {
        if (n < 1 || k < 1 || k > q8cuda::kMaxK) throw std::invalid_argument("cuda_nm24_pack: N >= 1, 1 <= K <= 65536");
        bindings::run_released([&] { return q8cuda::nm24_pack(ptr<const int8_t>(w), n, k, ptr<uint8_t>(out)); });
      },
      py::arg("w"), py::arg("n"), py::arg("k"), py::arg("out"),
      "the 2:4 GPU pack of CPU-packed int8 weights into out (cuda_nm24_bytes(n, k) bytes); ValueError naming the "
      "first channel and k with more than 2 non-zeros in 4");
  m.def(
      "cuda_nm24_emulate",
      [](std::uintptr_t x, int64_t rows, int64_t k, int64_t ldx, std::uintptr_t pack, int64_t pack_bytes,
         std::uintptr_t col_sum, std::uintptr_t w_scale, std::uintptr_t bias, int64_t n, std::uintptr_t y,
         std::uintptr_t raw, int act, bool is_static, float static_scale, int32_t static_zp, int32_t qmax) {
        q8cuda::EmulateArgs a{ptr<const float>(x), rows, k, ldx, nullptr, ptr<const int32_t>(col_sum),
                              ptr<const float>(w_scale), ptr<const float>(bias), n, ptr<float>(y), ptr<int32_t>(raw),
                              act, is_static, static_scale, static_zp, qmax, 0};
        q8cuda::Nm24Plan plan{};
        bindings::run_released([&] { return q8cuda::nm24_emulate(a, ptr<const uint8_t>(pack), pack_bytes, &plan); });
        py::dict d;
        d["grid"] = py::make_tuple(plan.grid_x, plan.grid_y);
        d["tiles"] = plan.tiles;
        d["steps"] = plan.steps;
        return d;
      },
      "y (or raw) = the CUDA 2:4 int8 linear's algorithm run on the CPU over its GPU pack; returns its plan");
  m.def(
      "cuda_nm24_fragments",
      [] {
        // Each lane's sparse fragment coordinates: (a: [(row, compressed col)] x 16, meta: [(row, chunk)] x 8,
        // b: [(k, n)] x 4).
        py::list lanes;
        for (int lane = 0; lane < 32; ++lane) {
          py::list a, e, b;
          for (int p = 0; p < q8cuda::kSpLaneBytes; ++p)
            a.append(py::make_tuple(q8cuda::sp_a_row(lane, p), q8cuda::sp_a_ccol(lane, p)));
          for (int j = 0; j < 8; ++j) e.append(py::make_tuple(q8cuda::sp_meta_row(lane, j), q8cuda::sp_meta_chunk(lane, j)));
          for (int r = 0; r < 4; ++r) b.append(py::make_tuple(q8cuda::sp_b_k(lane, r), q8cuda::sp_b_n(lane)));
          lanes.append(py::make_tuple(a, e, b));
        }
        return lanes;
      },
      "the mma.sp.m16n8k64 (8-bit) fragment coordinates of each lane (q8_nm24_tiling.h)");
  m.def(
      "cuda_q8_fragments",
      [] {
        // Each lane's fragment coordinates: (a: [(row, k)] x 4, b: [(k, n)] x 2, c: [(row, col)] x 4).
        py::list lanes;
        for (int lane = 0; lane < 32; ++lane) {
          py::list a, b, c;
          for (int r = 0; r < 4; ++r) a.append(py::make_tuple(q8cuda::a_frag_row(lane, r), q8cuda::a_frag_k(lane, r)));
          for (int r = 0; r < 2; ++r) b.append(py::make_tuple(q8cuda::b_frag_k(lane, r), q8cuda::b_frag_n(lane)));
          for (int e = 0; e < 4; ++e) c.append(py::make_tuple(q8cuda::c_frag_row(lane, e), q8cuda::c_frag_col(lane, e)));
          lanes.append(py::make_tuple(a, b, c));
        }
        return lanes;
      },
      "the mma.m16n8k32 fragment coordinates of each lane (q8_cuda_tiling.h)");
  m.def(
      "cuda_wgmma_operand_addresses",
      [] {
        // Stage-relative bytes the kernel's descriptors address, decoded with the canonical layout: A for both
        // warpgroups and both 32-k wgmma of a step, B for both.
        using q8cuda::WgTile;
        py::list a, b;
        for (int wg = 0; wg < WgTile::kWarpgroups; ++wg)
          for (int kk = 0; kk < q8cuda::kBK / WgTile::kWgK; ++kk) {
            const uint64_t d = q8cuda::wg_desc(q8cuda::wg_smem(wg * WgTile::kWgM, 0) + q8cuda::wg_smem(0, kk * WgTile::kWgK));
            for (int r = 0; r < WgTile::kWgM; ++r)
              for (int k = 0; k < WgTile::kWgK; ++k) a.append(q8cuda::wg_desc_address(d, r, k));
          }
        for (int kk = 0; kk < q8cuda::kBK / WgTile::kWgK; ++kk) {
          const uint64_t d = q8cuda::wg_desc(q8cuda::wg_smem(0, kk * WgTile::kWgK));
          for (int r = 0; r < WgTile::kWgN; ++r)
            for (int k = 0; k < WgTile::kWgK; ++k) b.append(q8cuda::wg_desc_address(d, r, k));
        }
        return py::make_tuple(a, b);
      },
      "the Hopper tile's operand bytes as its wgmma descriptors address them (q8_cuda_tiling.h)");
  m.def(
      "cuda_wgmma_staged_offsets",
      [] {
        // Stage-relative bytes the kernel's copies write (every copy valid).
        using q8cuda::WgTile;
        py::list a, b;
        for (int c = 0; c < WgTile::kAChunks; ++c) {
          const q8cuda::Copy cp = q8cuda::wg_a_copy(c, 0, 0, WgTile::kBM, q8cuda::kBK);
          for (int j = 0; j < q8cuda::kChunk; ++j) a.append(cp.dst + j);
        }
        for (int c = 0; c < WgTile::kBWords; ++c) {
          const q8cuda::Copy cp = q8cuda::wg_b_copy(c, 0, 0, WgTile::kBN / q8cuda::kPanel, q8cuda::kBK);
          for (int j = 0; j < q8cuda::kKGroup; ++j) b.append(cp.dst + j);
        }
        return py::make_tuple(a, b);
      },
      "the Hopper tile's stage bytes its copies write (q8_cuda_tiling.h)");
  m.def(
      "cuda_wgmma_accumulators",
      [] {
        py::list cells;
        for (int t = 0; t < 128; ++t)
          for (int i = 0; i < q8cuda::WgTile::kAcc; ++i)
            cells.append(py::make_tuple(q8cuda::wg_d_row(t, i), q8cuda::wg_d_col(t, i)));
        return cells;
      },
      "(row, column) of each accumulator of a warpgroup's 128 threads (q8_cuda_tiling.h)");
  m.def(
      "cuda_q8_kernels",
      [] {
        // Launch shape of each kernel the CUDA module holds: {name: (threads, dynamic shared memory bytes)}.
        py::dict d;
        auto tile = [&](auto t) {
          using T = decltype(t);
          const std::string name = "Tile<" + std::to_string(T::kBM) + ", " + std::to_string(T::kBN) + ", " +
                                   std::to_string(T::kWM) + ", " + std::to_string(T::kWN) + ", " +
                                   std::to_string(T::kStages) + ">";
          d[py::str(name)] = py::make_tuple(T::kThreads, T::kSmemBytes);
        };
        tile(q8cuda::SmallTile{});
        tile(q8cuda::LargeTile{});
        d["q8_gemm_wgmma"] = py::make_tuple(q8cuda::WgTile::kThreads, q8cuda::WgTile::kSmemBytes);
        d["quantize_rows"] = py::make_tuple(q8cuda::kQuantRowsPerBlock * 32, 0);
        d["q8_sparse_rows"] = py::make_tuple(q8cuda::kSparseWarps * 32, 0);
        d["sparse_f32_rows"] = py::make_tuple(q8cuda::kSparseWarps * 32, 0);
        d["q8_nm24"] = py::make_tuple(q8cuda::kSpWarps * 32, 0);
        d["q4_gemm"] = py::make_tuple(q8cuda::kQ4Warps * 32, 0);
        return d;
      },
      "threads and dynamic shared memory of each CUDA kernel (q8_cuda_tiling.h)");
  m.def("cuda_q8_smem_offsets", [](int row, int k, int n) {
    return py::make_tuple(q8cuda::a_smem(row, k), q8cuda::b_smem(n, k));
  });
}
