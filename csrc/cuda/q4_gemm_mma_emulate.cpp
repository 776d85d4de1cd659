// The W4A8 kernel (q4_gemm_mma__sm80.cu) run on the CPU, warp by warp and lane by lane, through the kernel's
// index math (q4_cuda_tiling.h): each block's panel and row chunk, each warp's steps (its own group, or its share
// of the one group), each lane's A registers unpacked from the words of the pack it loads and its B registers from
// the quantized rows (every read bounds-checked), mma.m16n8k32 s8 x u8 as the PTX ISA defines it, the warps' sums
// parked and folded into each output's float sum in group order, the CPU's epilogue. Part of the CPU module
// (`_C.cuda_q4_emulate`): the tests check on any machine that it equals the CPU kernel bit for bit.
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/q4_cuda_tiling.h"
#include "cuda/q8_cuda_emulate.h"

namespace pycompress {
namespace q8cuda {

std::string q4_emulate(const EmulateArgs& a, Q4Plan* out) {
  Q4Plan p;
  const char* why = nullptr;
  if (!q4_plan(a.m, a.n, a.k, a.groups, &p, &why)) return why;
  *out = p;
  if (a.m == 0) return "";
  const QuantizedRows qr = quantize_rows(a);
  const int64_t q_bytes = static_cast<int64_t>(qr.q.size());
  const int64_t w_bytes = p.grid_x * kPanel * p.kp / 2;
  std::vector<int> writes(static_cast<size_t>(a.m * a.n), 0);
  for (int64_t by = 0; by < p.grid_y; ++by)
    for (int64_t panel = 0; panel < p.grid_x; ++panel) {
      const int64_t r0 = by * kQ4Rows;
      // One warp's steps [s0, s1) by `stride` into acc.
      auto steps = [&](int64_t s0, int64_t s1, int64_t stride, int32_t (&acc)[32][4]) {
        for (int64_t s = s0; s < s1; s += stride) {
          uint32_t ra[32][4], rb[32][2];
          for (int lane = 0; lane < 32; ++lane) {
            for (int r = 0; r < 4; ++r) {
              const Q4Word w = q4_a_word(panel, p.kp, s, lane, r);
              ra[lane][r] =
                  w.valid ? q4_unpack(checked_load<uint32_t>(a.w4, w_bytes, w.offset, "the 4-bit pack"), w.shift) : 0u;
            }
            const int64_t row = r0 + b_frag_n(lane);
            for (int r = 0; r < 2; ++r)
              rb[lane][r] = row < a.m ? checked_load<uint32_t>(qr.q.data(), q_bytes,
                                                               row * p.ldq + s * kQ4Step + b_frag_k(lane, r),
                                                               "the quantized rows")
                                      : 0u;
          }
          mma_m16n8k32_warp<int8_t, uint8_t>(acc, ra, rb);
        }
      };
      float facc[4][32] = {};
      auto channel_of = [&](int e, int lane) { return panel * kPanel + c_frag_row(lane, e); };
      if (p.groups == 1) {
        uint32_t total[32][4] = {};
        for (int warp = 0; warp < kQ4Warps; ++warp) {
          int32_t acc[32][4] = {};
          steps(warp, p.steps, kQ4Warps, acc);
          for (int lane = 0; lane < 32; ++lane)
            for (int e = 0; e < 4; ++e) total[lane][e] += static_cast<uint32_t>(acc[lane][e]);
        }
        for (int lane = 0; lane < 32; ++lane)
          for (int e = 0; e < 4; ++e)
            facc[e][lane] = q4_fold(0.0f, static_cast<int32_t>(total[lane][e]),
                                    a.g_scale[q4_scale_index(channel_of(e, lane), 1, 0)]);
      } else {
        for (int64_t g0 = 0; g0 < p.groups; g0 += kQ4Warps)
          for (int warp = 0; warp < kQ4Warps && g0 + warp < p.groups; ++warp) {  // folded in group order
            const int64_t grp = g0 + warp;
            int32_t acc[32][4] = {};
            steps(grp * p.steps_per_group, (grp + 1) * p.steps_per_group, 1, acc);
            for (int lane = 0; lane < 32; ++lane)
              for (int e = 0; e < 4; ++e)
                facc[e][lane] = q4_fold(facc[e][lane], acc[lane][e],
                                        a.g_scale[q4_scale_index(channel_of(e, lane), p.groups, grp)]);
          }
      }
      for (int e = 0; e < 4; ++e)
        for (int lane = 0; lane < 32; ++lane) {
          const int64_t channel = channel_of(e, lane), row = r0 + c_frag_col(lane, e);
          if (channel >= a.n || row >= a.m) continue;
          writes[row * a.n + channel] += 1;
          finish_output(a, qr, row, channel,
                        [&] { return q4_dequantize(facc[e][lane], qr.zp[row], a.corr[channel], qr.scale[row]); });
        }
    }
  check_written_once(a, writes);
  return "";
}

}  // namespace q8cuda
}  // namespace pycompress
