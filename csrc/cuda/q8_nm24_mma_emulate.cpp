// The 2:4 sparse int8 kernel (q8_nm24_mma__sm80.cu) run on the CPU, warp by warp and lane by lane, through the
// kernel's index math (q8_nm24_tiling.h): each block's panel and row chunk, each warp's share of the k steps,
// each lane's value, metadata and activation registers loaded from the pack and the quantized rows (every read
// bounds-checked), mma.sp m16n8k64 as the PTX ISA defines it over those registers (the metadata selects the k
// of each kept value), the warps' sums added, and the dense kernel's epilogue. Part of the CPU module
// (`_C.cuda_nm24_emulate`): the tests check on any machine that it equals the dense reference bit for bit.
#include <array>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/q8_cuda_emulate.h"
#include "cuda/q8_nm24_tiling.h"

namespace pycompress {
namespace q8cuda {
namespace {

// mma.sp.m16n8k64.row.col.s32.s8.u8.s32 over one warp's registers: a [lane][16] compressed s8 values,
// e [lane] metadata, b [lane][4] words of u8.
void mma_sp_warp(int32_t (&acc)[32][4], const uint8_t (&a)[32][16], const uint32_t (&e)[32], const uint32_t (&b)[32][4]) {
  int32_t A[16][kSpK] = {}, B[kSpK][8] = {};
  bool set[16][kSpK] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int p = 0; p < kSpLaneBytes; ++p) {
      const int row = sp_a_row(lane, p), ccol = sp_a_ccol(lane, p), chunk = ccol >> 1;
      // The chunk's metadata nibble is in this lane's register: nibble p / 2 (q8_nm24_tiling.h).
      if (sp_meta_row(lane, p >> 1) != row || sp_meta_chunk(lane, p >> 1) != chunk)
        throw std::logic_error("cuda_nm24_emulate: a value and its metadata are in different nibbles");
      const uint32_t nibble = (e[lane] >> (4 * (p >> 1))) & 0xF;
      const int i0 = nibble & 3, i1 = (nibble >> 2) & 3;
      if (i0 >= i1) throw std::logic_error("cuda_nm24_emulate: metadata indices not ascending (ordered_metadata)");
      const int k = 4 * chunk + ((ccol & 1) ? i1 : i0);
      if (set[row][k]) throw std::logic_error("cuda_nm24_emulate: two values at one position");
      set[row][k] = true;
      A[row][k] = static_cast<int8_t>(a[lane][p]);
    }
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 4; ++j) B[sp_b_k(lane, r) + j][sp_b_n(lane)] = static_cast<uint8_t>(b[lane][r] >> (8 * j));
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int el = 0; el < 4; ++el) {
      int32_t s = 0;
      for (int k = 0; k < kSpK; ++k) s += A[c_frag_row(lane, el)][k] * B[k][c_frag_col(lane, el)];
      acc[lane][el] += s;
    }
}

}  // namespace

std::string nm24_emulate(const EmulateArgs& a, const uint8_t* pack, int64_t pack_bytes, Nm24Plan* out) {
  Nm24Plan p;
  const char* why = nullptr;
  if (!nm24_plan(a.m, a.n, a.k, &p, &why)) return why;
  *out = p;
  if (a.m == 0) return "";
  const Nm24Layout l = nm24_layout(a.n, a.k);
  if (pack_bytes != l.total) return "the 2:4 pack has " + std::to_string(pack_bytes) + " bytes, expected " +
                                    std::to_string(l.total);
  const QuantizedRows qr = quantize_rows(a);
  const int64_t q_bytes = static_cast<int64_t>(qr.q.size());
  std::vector<int> writes(static_cast<size_t>(a.m * a.n), 0);
  const int tiles = p.tiles;
  for (int64_t by = 0; by < p.grid_y; ++by)
    for (int64_t panel = 0; panel < p.grid_x; ++panel) {
      const int64_t r0 = by * 8 * tiles;
      // sums[warp][tile][lane][element]
      std::vector<int32_t> sums(static_cast<size_t>(kSpWarps * tiles * 32 * 4), 0);
      for (int warp = 0; warp < kSpWarps; ++warp)
        for (int64_t s = warp; s < p.steps; s += kSpWarps) {
          uint8_t av[32][16];
          uint32_t ev[32];
          for (int lane = 0; lane < 32; ++lane) {
            const int64_t slot = (panel * p.steps + s) * 32 + lane;
            const auto v = checked_load<std::array<uint32_t, 4>>(pack, l.values_bytes, slot * kSpLaneBytes, "the 2:4 values");
            std::memcpy(av[lane], v.data(), 16);
            ev[lane] = checked_load<uint32_t>(pack + l.values_bytes, l.meta_bytes, slot * 4, "the 2:4 metadata");
          }
          for (int j = 0; j < tiles; ++j) {
            uint32_t bv[32][4];
            for (int lane = 0; lane < 32; ++lane) {
              const int64_t row = r0 + 8 * j + sp_b_n(lane);
              for (int r = 0; r < 4; ++r)
                bv[lane][r] = row < a.m ? checked_load<uint32_t>(qr.q.data(), q_bytes, row * p.ldq + s * kSpK + sp_b_k(lane, r),
                                                         "the quantized rows")
                                        : 0u;
            }
            int32_t acc[32][4] = {};
            mma_sp_warp(acc, av, ev, bv);
            for (int lane = 0; lane < 32; ++lane)
              for (int el = 0; el < 4; ++el)
                sums[((static_cast<size_t>(warp) * tiles + j) * 32 + lane) * 4 + el] += acc[lane][el];
          }
        }
      for (int j = 0; j < tiles; ++j)
        for (int lane = 0; lane < 32; ++lane)
          for (int el = 0; el < 4; ++el) {
            uint32_t total = 0;
            for (int warp = 0; warp < kSpWarps; ++warp)
              total += static_cast<uint32_t>(sums[((static_cast<size_t>(warp) * tiles + j) * 32 + lane) * 4 + el]);
            const int64_t channel = panel * kPanel + c_frag_row(lane, el);
            const int64_t row = r0 + 8 * j + c_frag_col(lane, el);
            if (channel < a.n && row < a.m) {
              writes[row * a.n + channel] += 1;
              store_output(a, qr, static_cast<int32_t>(total), row, channel);
            }
          }
    }
  check_written_once(a, writes);
  return "";
}

}  // namespace q8cuda
}  // namespace pycompress
