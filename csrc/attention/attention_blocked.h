// The blocked (flash-style) attention shared by the vector paths, written once
// over a vector-traits type V. Included only by the ISA translation units
// (attention_*__avx2.cpp, attention_*__avx512vnni.cpp); everything has internal
// linkage so each TU keeps its own copy compiled with its own flags.
//
// V provides: T (register type), W (lanes), zero, set1, load, store,
// load_partial(p, n) / store_partial(p, x, n) for n < W lanes, fmadd(a, b, c) = a*b+c,
// add, sub, mul, div, max, hmax, hsum, first (lane 0), exp2, bool_keep(s, keep) which
// sets lanes whose keep byte is 0 to -inf, and transpose(src, lds, dst, ldd) of a
// W x W block.
//
// Per task (head (b, h), query rows [r0, r1)):
//   for each key block [k0, k1) (<= key_block(D) keys; under causal, only keys some row sees):
//     kt = K[k0:k1]^T                           (D x n, zero padded to W)
//     for each tile of R query rows:
//       S = scale log2(e) q_tile . kt           (R x n: W-wide columns, R x NK accumulators;
//                                                q read in place; scores in base 2)
//       per row: mask (additive ones times log2(e)), causality,
//                m' = max(m, max S), alpha = 2^(m - m'), P = 2^(S - m'),
//                l = l * alpha + sum P           (m' = -inf is replaced by 0 so a fully
//                                                 masked block gives P = 0, not NaN)
//       O_tile = alpha * O_tile + P . V[k0:k1]  (R x Dv: R x ND accumulators)
//   (dot products and value sums run over at most kSumRun terms in registers, then
//    add to the total in memory)
//   out rows = O / l (0 where l == 0: every key masked)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention/attention.h"
#include "attention/attention_exp.h"

namespace pycompress {
namespace attention {
namespace {

constexpr float kNegInfBlocked = -std::numeric_limits<float>::infinity();

// Dot products (kSumRun) and value sums (kValueRun) are accumulated in registers in
// runs of at most this many terms, then added to the running total in memory: a
// two-level sum whose rounding error grows with the run, not with D or Sk, like the
// blocked sums of a BLAS (one 128-term FMA chain made D = 128 outputs up to 6x less
// accurate than torch's float32 matmuls). Value runs are longer because each flush
// costs a load and a store per accumulator: runs of 32 cost [1,12,128,32] 1-3% and
// lowered the median error of the long-Sk test shapes by only 10-20%.
constexpr int64_t kSumRun = 32;
constexpr int64_t kValueRun = 128;

// One run of the dot products, e in [e0, e1), for R rows and NV vectors of columns:
// the first run stores its sums, later runs add theirs to S, the last scales S.
template <class V, int R, int NV, bool kFirst, bool kLast>
inline void qk_run(const float* qs, int64_t ldq, int64_t e0, int64_t e1, const float* kt, int64_t ldk, float* s,
                   int64_t lds, float scale2) {
  typename V::T acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = V::zero();
  for (int64_t e = e0; e < e1; ++e) {
    typename V::T kv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) kv[c] = V::load(kt + e * ldk + c * V::W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const typename V::T qb = V::set1(qs[r * ldq + e]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = V::fmadd(qb, kv[c], acc[r][c]);
    }
  }
  const typename V::T c2 = V::set1(scale2);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) {
      float* out = s + r * lds + c * V::W;
      const typename V::T total = kFirst ? acc[r][c] : V::add(V::load(out), acc[r][c]);
      V::store(out, kLast ? V::mul(total, c2) : total);
    }
}

// S[r][c] = scale2 * sum_e q[r][e] * kt[e][c] for R rows and NV vectors of columns.
// Scaling the dot products, not q, keeps the scores as accurate as torch's
// scale * (q @ k^T); scale2 = scale * log2(e) puts them in base 2.
template <class V, int R, int NV>
inline void qk_tile(const float* qs, int64_t ldq, int64_t d, const float* kt, int64_t ldk, float* s, int64_t lds,
                    float scale2) {
  if (d <= kSumRun) return qk_run<V, R, NV, true, true>(qs, ldq, 0, d, kt, ldk, s, lds, scale2);
  qk_run<V, R, NV, true, false>(qs, ldq, 0, kSumRun, kt, ldk, s, lds, scale2);
  int64_t e0 = kSumRun;
  for (; d - e0 > kSumRun; e0 += kSumRun) qk_run<V, R, NV, false, false>(qs, ldq, e0, e0 + kSumRun, kt, ldk, s, lds, scale2);
  qk_run<V, R, NV, false, true>(qs, ldq, e0, d, kt, ldk, s, lds, scale2);
}

template <class V, int R, int NV>
inline void qk_rows(const float* qs, int64_t ldq, int64_t d, const float* kt, int64_t ldk, float* s, int64_t lds,
                    int64_t ncols, float scale2) {
  int64_t c0 = 0;
  for (; c0 + NV * V::W <= ncols; c0 += NV * V::W) qk_tile<V, R, NV>(qs, ldq, d, kt + c0, ldk, s + c0, lds, scale2);
  for (; c0 < ncols; c0 += V::W) qk_tile<V, R, 1>(qs, ldq, d, kt + c0, ldk, s + c0, lds, scale2);
}

// O[r][:] = alpha[r] * O[r][:] + sum_j P[r][j] * v[j][:] over NV vectors of output
// columns; the last vector holds `tail` columns of v when kPartial (O is padded). The
// keys are summed in runs of kSumRun, each run added to O in memory.
template <class V, int R, int NV, bool kPartial>
inline void pv_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t nkeys, float* o, int64_t ldo,
                    const float* alpha, int tail) {
  for (int64_t j0 = 0; j0 < nkeys; j0 += kValueRun) {
    const int64_t j1 = nkeys - j0 < kValueRun ? nkeys : j0 + kValueRun;
    typename V::T acc[R][NV];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = V::zero();
    for (int64_t j = j0; j < j1; ++j) {
      typename V::T vv[NV];
      const float* vj = v + j * ldv;
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) {
        vv[c] = (kPartial && c == NV - 1) ? V::load_partial(vj + c * V::W, tail) : V::load(vj + c * V::W);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const typename V::T pb = V::set1(p[r * ldp + j]);
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) acc[r][c] = V::fmadd(pb, vv[c], acc[r][c]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const typename V::T a = V::set1(j0 == 0 ? alpha[r] : 1.0f);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) {
        float* out = o + r * ldo + c * V::W;
        V::store(out, V::fmadd(V::load(out), a, acc[r][c]));
      }
    }
  }
}

template <class V, int R, int NV>
inline void pv_rows(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t nkeys, int64_t dv, float* o,
                    int64_t ldo, const float* alpha) {
  int64_t c0 = 0;
  for (; c0 + NV * V::W <= dv; c0 += NV * V::W) pv_tile<V, R, NV, false>(p, ldp, v + c0, ldv, nkeys, o + c0, ldo, alpha, 0);
  for (; c0 + V::W <= dv; c0 += V::W) pv_tile<V, R, 1, false>(p, ldp, v + c0, ldv, nkeys, o + c0, ldo, alpha, 0);
  if (c0 < dv) {
    pv_tile<V, R, 1, true>(p, ldp, v + c0, ldv, nkeys, o + c0, ldo, alpha, static_cast<int>(dv - c0));
  }
}

// Tiles of fewer than R rows (the last of a chunk) get their own instantiation, so
// a single query row (decoding) does one row's work, not R rows'.
template <class V, int R, int NK, int ND>
struct TileRows {
  static void qk(int rows, const float* qs, int64_t ldq, int64_t d, const float* kt, int64_t ldk, float* s,
                 int64_t lds, int64_t ncols, float scale2) {
    if (rows == R) return qk_rows<V, R, NK>(qs, ldq, d, kt, ldk, s, lds, ncols, scale2);
    TileRows<V, R - 1, NK, ND>::qk(rows, qs, ldq, d, kt, ldk, s, lds, ncols, scale2);
  }
  static void pv(int rows, const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t nkeys, int64_t dv,
                 float* o, int64_t ldo, const float* alpha) {
    if (rows == R) return pv_rows<V, R, ND>(p, ldp, v, ldv, nkeys, dv, o, ldo, alpha);
    TileRows<V, R - 1, NK, ND>::pv(rows, p, ldp, v, ldv, nkeys, dv, o, ldo, alpha);
  }
};
template <class V, int NK, int ND>
struct TileRows<V, 0, NK, ND> {
  static void qk(int, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t, float) {}
  static void pv(int, const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t, const float*) {}
};

// Where row i's mask values for keys k0.. start, and how to read them.
struct MaskRow {
  MaskKind kind;
  const void* p;
  int64_t stride;
};

// Adds the mask, in base-2 units, to n scores (bool: -inf where the byte is 0).
template <class V>
inline void apply_mask(float* s, int64_t n, const MaskRow& mr) {
  if (mr.kind == MaskKind::Additive) {
    const float* m = static_cast<const float*>(mr.p);
    const typename V::T vlog2e = V::set1(exp_c::kLog2e);
    if (mr.stride == 1) {
      int64_t j = 0;
      for (; j + V::W <= n; j += V::W) V::store(s + j, V::fmadd(V::load(m + j), vlog2e, V::load(s + j)));
      for (; j < n; ++j) s[j] += m[j] * exp_c::kLog2e;
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] += m[j * mr.stride] * exp_c::kLog2e;
    }
  } else if (mr.kind == MaskKind::Bool) {
    const uint8_t* m = static_cast<const uint8_t*>(mr.p);
    if (mr.stride == 1) {
      int64_t j = 0;
      for (; j + V::W <= n; j += V::W) V::store(s + j, V::bool_keep(V::load(s + j), m + j));
      for (; j < n; ++j) s[j] = m[j] ? s[j] : kNegInfBlocked;
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] = m[j * mr.stride] ? s[j] : kNegInfBlocked;
    }
  }
}

// The softmax step of one row tile and one key block: base-2 scores s[r][0, n) become
// probabilities 2^(s - m'), with s[r][visible[r], n) hidden by causality; s[r][n, np)
// is padding. Updates each row's running max m and sum l, and sets alpha[r], the factor
// the row's earlier accumulators are scaled by. Rows are handled pass by pass (all
// maxima, then one vector exp2 for every alpha, then all exponentials) so the
// out-of-order core overlaps the rows' reductions.
template <class V, int R>
inline void softmax_tile(float* s, int64_t lds, int rows, int64_t n, int64_t np, const int64_t* visible,
                         const MaskRow* masks, float* m, float* l, float* alpha) {
  static_assert(R <= V::W, "one vector holds the tile's alphas");
  alignas(64) float delta[V::W] = {};
  float base[R];
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * lds;
    if (masks[r].kind != MaskKind::None) apply_mask<V>(sr, n, masks[r]);
    for (int64_t j = visible[r] < 0 ? 0 : visible[r]; j < np; ++j) sr[j] = kNegInfBlocked;
    typename V::T vmax = V::set1(kNegInfBlocked);
    for (int64_t j = 0; j < np; j += V::W) vmax = V::max(vmax, V::load(sr + j));
    const float block_max = V::hmax(vmax);
    const float m_new = block_max > m[r] ? block_max : m[r];
    base[r] = m_new == kNegInfBlocked ? 0.0f : m_new;
    delta[r] = m[r] - base[r];
    m[r] = m_new;
  }
  V::store(alpha, V::exp2(V::load(delta)));
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * lds;
    const typename V::T vbase = V::set1(base[r]);
    typename V::T vsum = V::zero();
    for (int64_t j = 0; j < np; j += V::W) {
      const typename V::T p = V::exp2(V::sub(V::load(sr + j), vbase));
      V::store(sr + j, p);
      vsum = V::add(vsum, p);
    }
    l[r] = l[r] * alpha[r] + V::hsum(vsum);
  }
}

// kt[e][j] = k[j][e] for n keys (rows k_ss apart), columns [n, np) zeroed: W x W
// blocks transposed in registers, the edges element by element.
template <class V>
inline void pack_kt(const float* k, int64_t k_ss, int64_t n, int64_t np, int64_t d, float* kt, int64_t ldk) {
  int64_t j = 0;
  for (; j + V::W <= n; j += V::W) {
    int64_t e = 0;
    for (; e + V::W <= d; e += V::W) V::transpose(k + j * k_ss + e, k_ss, kt + e * ldk + j, ldk);
    for (; e < d; ++e)
      for (int64_t jj = j; jj < j + V::W; ++jj) kt[e * ldk + jj] = k[jj * k_ss + e];
  }
  for (int64_t e = 0; e < d; ++e) {
    for (int64_t jj = j; jj < n; ++jj) kt[e * ldk + jj] = k[jj * k_ss + e];
    for (int64_t jj = n; jj < np; ++jj) kt[e * ldk + jj] = 0.0f;
  }
}

template <class V, int R, int NK, int ND>
void attend_rows_blocked(const AttentionArgs& a, int64_t b, int64_t h, int64_t r0, int64_t r1, const Workspace& ws) {
  const int64_t d = a.d, dv = a.dv, rows = r1 - r0;
  const int64_t kb = key_block(d);
  const int64_t ldo = round_up(dv, kPad);

  const float* qb = a.q + b * a.q_sb + h * a.q_sh;
  const float scale2 = a.scale * exp_c::kLog2e;  // scores in base 2 (attention_exp.h)
  const float* kbase = a.k + b * a.k_sb + h * a.k_sh;
  const float* vbase = a.v + b * a.v_sb + h * a.v_sh;
  for (int64_t i = 0; i < rows; ++i) {
    ws.m[i] = kNegInfBlocked;
    ws.l[i] = 0.0f;
  }
  std::memset(ws.o, 0, sizeof(float) * rows * ldo);

  const int64_t mask_elem = a.mask_kind == MaskKind::Bool ? 1 : 4;
  const char* mask_head = a.mask_kind == MaskKind::None
                              ? nullptr
                              : static_cast<const char*>(a.mask) + (b * a.m_sb + h * a.m_sh) * mask_elem;
  // Under causality the last row of the chunk sees keys [0, r1): later keys are never read.
  const int64_t kend = a.causal ? (r1 < a.sk ? r1 : a.sk) : a.sk;
  alignas(64) float alpha[V::W];
  for (int64_t k0 = 0; k0 < kend; k0 += kb) {
    const int64_t n = kend - k0 < kb ? kend - k0 : kb;
    const int64_t np = round_up(n, V::W);
    const int64_t ldk = np;  // K^T and the scores are as wide as this block
    const int64_t lds = np;
    pack_kt<V>(kbase + k0 * a.k_ss, a.k_ss, n, np, d, ws.kt, ldk);

    for (int64_t t0 = 0; t0 < rows; t0 += R) {
      const int tr = static_cast<int>(rows - t0 < R ? rows - t0 : R);
      const int64_t g0 = r0 + t0;  // first query row of the tile
      int64_t nt = n;
      if (a.causal) {
        const int64_t seen = g0 + tr - k0;  // keys of this block the tile's last row sees
        if (seen <= 0) continue;
        nt = seen < n ? seen : n;
      }
      const int64_t ntp = round_up(nt, V::W);
      TileRows<V, R, NK, ND>::qk(tr, qb + g0 * a.q_ss, a.q_ss, d, ws.kt, ldk, ws.s, lds, ntp, scale2);
      MaskRow masks[R];
      int64_t visible[R];
      for (int r = 0; r < tr; ++r) {
        const int64_t g = g0 + r;
        masks[r] = MaskRow{a.mask_kind, nullptr, a.m_sk};
        if (mask_head != nullptr) masks[r].p = mask_head + (g * a.m_ss + k0 * a.m_sk) * mask_elem;
        visible[r] = a.causal && g + 1 - k0 < nt ? g + 1 - k0 : nt;
      }
      softmax_tile<V, R>(ws.s, lds, tr, nt, ntp, visible, masks, ws.m + t0, ws.l + t0, alpha);
      TileRows<V, R, NK, ND>::pv(tr, ws.s, lds, vbase + k0 * a.v_ss, a.v_ss, nt, dv, ws.o + t0 * ldo, ldo, alpha);
    }
  }

  for (int64_t i = 0; i < rows; ++i) {
    float* out = a.out + ((b * a.sq + r0 + i) * a.heads + h) * dv;
    const float l = ws.l[i];
    const float* o = ws.o + i * ldo;
    if (l == 0.0f) {
      std::memset(out, 0, sizeof(float) * dv);
      continue;
    }
    const typename V::T vl = V::set1(l);
    int64_t e = 0;
    for (; e + V::W <= dv; e += V::W) V::store(out + e, V::div(V::load(o + e), vl));
    if (e < dv) V::store_partial(out + e, V::div(V::load(o + e), vl), static_cast<int>(dv - e));
  }
}

template <class V>
void exp2_n_blocked(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store(y + i, V::exp2(V::load(x + i)));
  if (i < n) V::store_partial(y + i, V::exp2(V::load_partial(x + i, static_cast<int>(n - i))), static_cast<int>(n - i));
}

}  // namespace
}  // namespace attention
}  // namespace pycompress
