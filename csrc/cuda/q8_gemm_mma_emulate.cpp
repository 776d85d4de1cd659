// The CUDA int8 linear's algorithm run on the CPU, warp by warp and lane by
// lane, through the same index math as the kernel (q8_cuda_tiling.h): the
// plan, the cp.async copies into each stage of the ring (every read
// bounds-checked, every stage inside the block's shared memory), each lane's
// fragment registers loaded from the staged bytes, mma.m16n8k32 as the PTX ISA
// defines it over those registers, split-K's partial sums met in whichever
// block of a tile arrives last, and the epilogue per accumulator element. Part of the CPU module (`_C.cuda_q8_emulate`), so the tests check on
// any machine that the tiling covers every output once, that tails and padding
// read nothing out of bounds, and that the result equals the reference bit for
// bit. Only the GPU can check the fragment layouts against the hardware.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/q8_cuda_emulate.h"
#include "cuda/q8_cuda_tiling.h"

namespace pycompress {
namespace q8cuda {
namespace {

struct Buffer {
  const uint8_t* data;
  int64_t size;
  const char* name;
};

void copy16(uint8_t* dst, const Buffer& src, const Copy& c) {
  if (!c.valid) {
    std::memset(dst + c.dst, 0, kChunk);
    return;
  }
  if (c.src < 0 || c.src + kChunk > src.size)
    throw std::logic_error(std::string("cuda_q8_emulate: a copy reads ") + src.name + " out of bounds at byte " +
                           std::to_string(c.src));
  std::memcpy(dst + c.dst, src.data + c.src, kChunk);
}

template <class TileT>
void gemm(const EmulateArgs& a, const Plan& p, const QuantizedRows& qr, std::vector<int>& writes) {
  const Buffer qbuf{qr.q.data(), static_cast<int64_t>(qr.q.size()), "the quantized rows"};
  const Buffer wbuf{reinterpret_cast<const uint8_t*>(a.w), p.panels * p.kp * kPanel, "the packed weights"};
  constexpr int kWarps = TileT::kThreads / 32;
  constexpr int S = TileT::kStages;
  // The block's dynamic shared memory, laid out as the kernel's: S A stages, then S B stages.
  std::vector<uint8_t> smem(TileT::kSmemBytes);
  auto stage_view = [&](int offset, int bytes) {
    if (offset < 0 || offset + bytes > TileT::kSmemBytes)
      throw std::logic_error("cuda_q8_emulate: a stage lies outside the block's shared memory");
    return std::vector<uint8_t>(smem.begin() + offset, smem.begin() + offset + bytes);
  };
  // acc[warp][i][j][lane][e]
  const size_t acc_size = static_cast<size_t>(kWarps) * TileT::kMTiles * TileT::kNTiles * 32 * 4;
  auto acc_at = [&](std::vector<int32_t>& acc, int w, int i, int j) {
    return reinterpret_cast<int32_t(*)[4]>(&acc[((static_cast<size_t>(w) * TileT::kMTiles + i) * TileT::kNTiles + j) * 128]);
  };
  // Split-K: each split's partial sums ([splits][m][n]) and each tile's arrival count, as in the scratch.
  std::vector<int32_t> partial(p.splits > 1 ? static_cast<size_t>(p.splits * a.m * a.n) : 0);
  std::vector<int> arrivals(static_cast<size_t>(p.grid_x * p.grid_y), 0);
  // f(accumulator, row, col) for each accumulator of the block's warps that lies inside the output.
  auto for_each_output = [&](std::vector<int32_t>& acc, int64_t m0, int64_t n0, auto&& f) {
    for (int w = 0; w < kWarps; ++w) {
      const int wm = (w / TileT::kWarpsN) * TileT::kWM, wn = (w % TileT::kWarpsN) * TileT::kWN;
      for (int i = 0; i < TileT::kMTiles; ++i)
        for (int j = 0; j < TileT::kNTiles; ++j)
          for (int lane = 0; lane < 32; ++lane)
            for (int e = 0; e < 4; ++e) {
              const int64_t row = m0 + wm + i * kMmaM + c_frag_row(lane, e);
              const int64_t col = n0 + wn + j * kMmaN + c_frag_col(lane, e);
              if (row < a.m && col < a.n) f(acc_at(acc, w, i, j)[lane][e], row, col);
            }
    }
  };
  for (int64_t by = 0; by < p.grid_y; ++by)
    for (int64_t bx = 0; bx < p.grid_x; ++bx)
      for (int64_t zi = 0; zi < p.splits; ++zi) {
        // Splits finish in any order on a GPU: odd column tiles run theirs backwards here, so the last to
        // arrive is not always the last split.
        const int64_t bz = bx % 2 ? p.splits - 1 - zi : zi;
        const int64_t m0 = by * TileT::kBM, n0 = bx * TileT::kBN, p0 = n0 / kPanel;
        const int64_t step0 = bz * p.steps_per_split, step1 = std::min(p.steps, step0 + p.steps_per_split);
        if (step1 <= step0) throw std::logic_error("cuda_q8_emulate: a split without k steps");
        std::vector<int32_t> acc(acc_size, 0);
        for (int64_t i = 0; i < step1 - step0; ++i) {
          const int s = static_cast<int>(i % S);
          const int64_t k0 = (step0 + i) * kBK;
          const int a_off = s * TileT::kAStageBytes, b_off = S * TileT::kAStageBytes + s * TileT::kBStageBytes;
          std::vector<uint8_t> a_stage = stage_view(a_off, TileT::kAStageBytes);
          std::vector<uint8_t> b_stage = stage_view(b_off, TileT::kBStageBytes);
          for (int c = 0; c < TileT::kAChunks; ++c) copy16(a_stage.data(), qbuf, a_copy(c, m0, k0, a.m, p.ldq));
          for (int c = 0; c < TileT::kBChunks; ++c) copy16(b_stage.data(), wbuf, b_copy(c, p0, k0, p.panels, p.kp));
          std::copy(a_stage.begin(), a_stage.end(), smem.begin() + a_off);
          std::copy(b_stage.begin(), b_stage.end(), smem.begin() + b_off);
          for (int w = 0; w < kWarps; ++w) {
            const int wm = (w / TileT::kWarpsN) * TileT::kWM, wn = (w % TileT::kWarpsN) * TileT::kWN;
            for (int ks = 0; ks < kBK; ks += kMmaK)
              for (int mi = 0; mi < TileT::kMTiles; ++mi)
                for (int j = 0; j < TileT::kNTiles; ++j) {
                  uint32_t ra[32][4], rb[32][2];
                  for (int lane = 0; lane < 32; ++lane) {
                    for (int r = 0; r < 4; ++r)
                      ra[lane][r] = checked_load<uint32_t>(
                          a_stage.data(), TileT::kAStageBytes,
                          a_smem(wm + mi * kMmaM + a_frag_row(lane, r), ks + a_frag_k(lane, r)), "an A fragment");
                    for (int r = 0; r < 2; ++r)
                      rb[lane][r] = checked_load<uint32_t>(
                          b_stage.data(), TileT::kBStageBytes,
                          b_smem(wn + j * kMmaN + b_frag_n(lane), ks + b_frag_k(lane, r)), "a B fragment");
                  }
                  mma_m16n8k32_warp<uint8_t, int8_t>(*reinterpret_cast<int32_t(*)[32][4]>(acc_at(acc, w, mi, j)), ra,
                                                     rb);
                }
          }
        }
        if (p.splits > 1) {
          for_each_output(acc, m0, n0, [&](int32_t& v, int64_t row, int64_t col) {
            partial[(bz * a.m + row) * a.n + col] = v;
          });
          if (++arrivals[by * p.grid_x + bx] != p.splits) continue;  // not the tile's last block
          for_each_output(acc, m0, n0, [&](int32_t& v, int64_t row, int64_t col) {
            uint32_t sum = 0;
            for (int64_t z = 0; z < p.splits; ++z)
              sum += static_cast<uint32_t>(z == bz ? v : partial[(z * a.m + row) * a.n + col]);
            v = static_cast<int32_t>(sum);
          });
        }
        for_each_output(acc, m0, n0, [&](int32_t& v32, int64_t row, int64_t col) {
          writes[row * a.n + col] += 1;
          store_output(a, qr, v32, row, col);
        });
      }
}

void copy4(uint8_t* dst, const Buffer& src, const Copy& c) {
  if (!c.valid) {
    std::memset(dst + c.dst, 0, 4);
    return;
  }
  if (c.src < 0 || c.src + 4 > src.size || c.src % 4 != 0)
    throw std::logic_error(std::string("cuda_q8_emulate: a 4-byte copy reads ") + src.name +
                           " out of bounds or misaligned at byte " + std::to_string(c.src));
  std::memcpy(dst + c.dst, src.data + c.src, 4);
}

// The Hopper tile (q8_gemm_wgmma__sm90a.cu): each stage copied as the kernel's threads copy it into a block's
// shared memory, each wgmma.mma_async's operands read where the kernel's descriptors point (decoded with the
// PTX ISA's canonical layout, wg_desc_address), the products summed into each thread's accumulators through
// the accumulator layout (wg_d_row / wg_d_col), split-K's sums met in the tile's last block, the epilogue.
void gemm_wgmma(const EmulateArgs& a, const Plan& p, const QuantizedRows& qr, std::vector<int>& writes) {
  const Buffer qbuf{qr.q.data(), static_cast<int64_t>(qr.q.size()), "the quantized rows"};
  const Buffer wbuf{reinterpret_cast<const uint8_t*>(a.w), p.panels * p.kp * kPanel, "the packed weights"};
  constexpr int S = WgTile::kStages, kWgThreads = 128;
  std::vector<uint8_t> smem(WgTile::kSmemBytes);
  auto byte_at = [&](int64_t address) {
    if (address < 0 || address >= WgTile::kSmemBytes)
      throw std::logic_error("cuda_q8_emulate: a wgmma operand address leaves the block's shared memory");
    return smem[static_cast<size_t>(address)];
  };
  std::vector<int32_t> partial(p.splits > 1 ? static_cast<size_t>(p.splits * a.m * a.n) : 0);
  std::vector<int> arrivals(static_cast<size_t>(p.grid_x * p.grid_y), 0);
  for (int64_t by = 0; by < p.grid_y; ++by)
    for (int64_t bx = 0; bx < p.grid_x; ++bx)
      for (int64_t zi = 0; zi < p.splits; ++zi) {
        const int64_t bz = bx % 2 ? p.splits - 1 - zi : zi;  // splits arrive in any order
        const int64_t m0 = by * WgTile::kBM, n0 = bx * WgTile::kBN, p0 = n0 / kPanel;
        const int64_t step0 = bz * p.steps_per_split, step1 = std::min(p.steps, step0 + p.steps_per_split);
        if (step1 <= step0) throw std::logic_error("cuda_q8_emulate: a split without k steps");
        // acc[warpgroup][thread][i]
        std::vector<int32_t> acc(static_cast<size_t>(WgTile::kWarpgroups * kWgThreads * WgTile::kAcc), 0);
        for (int64_t i = 0; i < step1 - step0; ++i) {
          const int s = static_cast<int>(i % S);
          const int64_t k0 = (step0 + i) * kBK;
          uint8_t* a_stage = smem.data() + s * WgTile::kAStageBytes;
          uint8_t* b_stage = smem.data() + S * WgTile::kAStageBytes + s * WgTile::kBStageBytes;
          for (int c = 0; c < WgTile::kAChunks; ++c) copy16(a_stage, qbuf, wg_a_copy(c, m0, k0, a.m, p.ldq));
          for (int c = 0; c < WgTile::kBWords; ++c) copy4(b_stage, wbuf, wg_b_copy(c, p0, k0, p.panels, p.kp));
          for (int wg = 0; wg < WgTile::kWarpgroups; ++wg) {
            // The kernel's descriptors, relative to a shared window starting at the block's dynamic memory.
            const uint32_t a_addr = s * WgTile::kAStageBytes + wg_smem(wg * WgTile::kWgM, 0);
            const uint32_t b_addr = S * WgTile::kAStageBytes + s * WgTile::kBStageBytes;
            for (int kk = 0; kk < kBK / WgTile::kWgK; ++kk) {
              const uint64_t da = wg_desc(a_addr + wg_smem(0, kk * WgTile::kWgK));
              const uint64_t db = wg_desc(b_addr + wg_smem(0, kk * WgTile::kWgK));
              int32_t A[WgTile::kWgM][WgTile::kWgK], B[WgTile::kWgN][WgTile::kWgK];
              for (int r = 0; r < WgTile::kWgM; ++r)
                for (int k = 0; k < WgTile::kWgK; ++k) A[r][k] = byte_at(wg_desc_address(da, r, k));
              for (int r = 0; r < WgTile::kWgN; ++r)
                for (int k = 0; k < WgTile::kWgK; ++k)
                  B[r][k] = static_cast<int8_t>(byte_at(wg_desc_address(db, r, k)));
              for (int t = 0; t < kWgThreads; ++t)
                for (int e = 0; e < WgTile::kAcc; ++e) {
                  const int row = wg_d_row(t, e), col = wg_d_col(t, e);
                  int32_t sum = 0;
                  for (int k = 0; k < WgTile::kWgK; ++k) sum += A[row][k] * B[col][k];
                  acc[(static_cast<size_t>(wg) * kWgThreads + t) * WgTile::kAcc + e] += sum;
                }
            }
          }
        }
        auto for_each_output = [&](auto&& f) {
          for (int wg = 0; wg < WgTile::kWarpgroups; ++wg)
            for (int t = 0; t < kWgThreads; ++t)
              for (int e = 0; e < WgTile::kAcc; ++e) {
                const int64_t row = m0 + wg * WgTile::kWgM + wg_d_row(t, e), col = n0 + wg_d_col(t, e);
                if (row < a.m && col < a.n) f(acc[(static_cast<size_t>(wg) * kWgThreads + t) * WgTile::kAcc + e], row, col);
              }
        };
        if (p.splits > 1) {
          for_each_output([&](int32_t& v, int64_t row, int64_t col) { partial[(bz * a.m + row) * a.n + col] = v; });
          if (++arrivals[by * p.grid_x + bx] != p.splits) continue;
          for_each_output([&](int32_t& v, int64_t row, int64_t col) {
            uint32_t sum = 0;
            for (int64_t z = 0; z < p.splits; ++z) sum += static_cast<uint32_t>(partial[(z * a.m + row) * a.n + col]);
            v = static_cast<int32_t>(sum);
          });
        }
        for_each_output([&](int32_t& v, int64_t row, int64_t col) {
          writes[row * a.n + col] += 1;
          store_output(a, qr, v, row, col);
        });
      }
}

}  // namespace

QuantizedRows quantize_rows(const EmulateArgs& a) {
  // The quantization kernel: one warp per row, lanes striding k (min / max are exact: any order gives the same).
  QuantizedRows r;
  r.ldq = q_ld(a.k);
  r.q.assign(static_cast<size_t>(a.m * r.ldq), 0);
  r.nonfinite.assign(static_cast<size_t>(a.m), 0);
  r.scale.assign(static_cast<size_t>(a.m), 0.0f);
  r.zp.assign(static_cast<size_t>(a.m), 0);
  for (int64_t row = 0; row < a.m; ++row) {
    const float* x = a.x + row * a.ldx;
    float lo = 0.0f, hi = 0.0f;
    bool finite = true;
    for (int64_t k = 0; k < a.k; ++k) {
      finite = finite && std::isfinite(x[k]);
      lo = std::fmin(lo, x[k]);
      hi = std::fmax(hi, x[k]);
    }
    const RowQuant rq = row_quant(lo, hi, finite, a.is_static, a.static_scale, a.static_zp, a.qmax);
    for (int64_t k = 0; k < r.ldq; ++k)
      r.q[row * r.ldq + k] = (rq.finite && k < a.k) ? quantize_value(x[k], rq.inv_scale, rq.zp, a.qmax) : uint8_t{0};
    r.scale[row] = rq.scale;
    r.zp[row] = rq.zp;
    r.nonfinite[row] = rq.finite ? 0 : 1;
  }
  return r;
}

void store_output(const EmulateArgs& a, const QuantizedRows& qr, int32_t acc, int64_t row, int64_t col) {
  if (a.raw != nullptr) {
    a.raw[row * a.n + col] = acc;
    return;
  }
  finish_output(a, qr, row, col,
                [&] { return dequantize(acc, qr.zp[row], a.col_sum[col], qr.scale[row], a.w_scale[col]); });
}

void check_written_once(const EmulateArgs& a, const std::vector<int>& writes) {
  for (int64_t i = 0; i < a.m * a.n; ++i)
    if (writes[i] != 1)
      throw std::logic_error("cuda_q8_emulate: output " + std::to_string(i) + " written " + std::to_string(writes[i]) +
                             " times");
}

std::string emulate(const EmulateArgs& a, Plan* out) {
  Plan p;
  const char* why = nullptr;
  if (!plan(a.m, a.n, a.k, a.sms, a.wgmma, &p, &why)) return why;
  *out = p;
  if (a.m == 0) return "";
  const QuantizedRows qr = quantize_rows(a);
  std::vector<int> writes(static_cast<size_t>(a.m * a.n), 0);
  if (p.tile == TileKind::Small)
    gemm<SmallTile>(a, p, qr, writes);
  else if (p.tile == TileKind::Large)
    gemm<LargeTile>(a, p, qr, writes);
  else
    gemm_wgmma(a, p, qr, writes);
  check_written_once(a, writes);
  return "";
}

}  // namespace q8cuda
}  // namespace pycompress
