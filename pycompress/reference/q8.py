"""Reference for the int8 linear (csrc/q8/q8_gemm.h states the contract).

Each float32 step below is one IEEE operation, as in the kernels, so the
reference reproduces the kernels' outputs bit for bit.
"""

from __future__ import annotations

import math

import torch

PANEL = 16  # output channels per packed panel
KGROUP = 4  # k values per 32-bit lane
MAX_K = 65536  # beyond this an int32 accumulator of u8*s8 products can overflow

_F32 = torch.float32
_FLT_MIN = torch.finfo(torch.float32).tiny


def round_up(v: int, m: int) -> int:
    """v rounded up to a multiple of m (K to KGROUP, N to PANEL, K to a 1x4 block)."""
    return (v + m - 1) // m * m


def quantize_weight_per_channel(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization: w ~ q * scale[n], q in [-(2^(b-1)-1), 2^(b-1)-1].

    Returns (q int8 [N, K], scale float32 [N]). An all-zero channel gets scale 1.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be in [2, 8], got {bits}")
    w = weight.detach().to(torch.float32)
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)
    return q, scale.to(_F32).contiguous()


def pack_int8_weights(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] -> (packed int8 [Np/16 * Kp/4 * 16 * 4], col_sum int32 [Np])."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int8_weights: expected a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    np_, kp = round_up(n, PANEL), round_up(k, KGROUP)
    padded = torch.zeros(np_, kp, dtype=torch.int8)
    padded[:n, :k] = q
    packed = padded.view(np_ // PANEL, PANEL, kp // KGROUP, KGROUP).permute(0, 2, 1, 3).contiguous().view(-1)
    col_sum = padded.sum(dim=1, dtype=torch.int32)
    return packed, col_sum


def unpack_int8_weights(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    np_, kp = round_up(n, PANEL), round_up(k, KGROUP)
    if packed.numel() != np_ * kp:
        raise ValueError(f"packed weights hold {packed.numel()} bytes, expected {np_ * kp} for N={n}, K={k}")
    full = packed.view(np_ // PANEL, kp // KGROUP, PANEL, KGROUP).permute(0, 2, 1, 3).reshape(np_, kp)
    return full[:n, :k].contiguous()


ACT_BITS = (7, 8)  # activation formats: u8, and u7 (exact on AVX2's vpmaddubsw; q8_gemm.h)


def act_qmax(act_bits: int) -> int:
    """The largest quantized activation of a format (csrc/q8/q8_gemm.h act_qmax)."""
    if act_bits not in ACT_BITS:
        raise ValueError(f"activation bits must be one of {ACT_BITS}, got {act_bits!r}")
    return 2 ** act_bits - 1


def quantize_rows_ref(
    x: torch.Tensor, static: tuple[float, int] | None = None, act_bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation quantization to act_bits unsigned values with a zero point, per row (dynamic) or
    fixed (static).

    Returns (q uint8 [M, K], scale float32 [M], zp int32 [M], nonfinite bool [M]).
    Non-finite rows get q = 0, scale = 1, zp = 0.
    """
    qmax = act_qmax(act_bits)
    x = x.to(_F32)
    m = x.shape[0]
    finite = torch.isfinite(x).all(dim=1) if x.shape[1] else torch.ones(m, dtype=torch.bool)
    if static is None:
        zero = torch.zeros(m, dtype=_F32)
        lo = torch.minimum(x.amin(dim=1), zero) if x.shape[1] else zero
        hi = torch.maximum(x.amax(dim=1), zero) if x.shape[1] else zero
        scale = (hi - lo) / torch.tensor(float(qmax), dtype=_F32)
        scale = torch.where(scale < _FLT_MIN, torch.tensor(_FLT_MIN, dtype=_F32), scale)
    else:
        scale = torch.full((m,), static[0], dtype=_F32)
    finite = finite & (scale <= torch.finfo(_F32).max)
    scale = torch.where(finite, scale, torch.ones_like(scale))
    inv = torch.tensor(1.0, dtype=_F32) / scale
    if static is None:
        zp = torch.clamp(torch.round(-lo * inv), 0, qmax).to(torch.int32)
    else:
        zp = torch.full((m,), static[1], dtype=torch.int32)
    zp = torch.where(finite, zp, torch.zeros_like(zp))
    v = torch.clamp(x * inv[:, None], -256.0, 256.0)
    v = torch.where(finite[:, None], v, torch.zeros_like(v))
    q = torch.clamp(torch.round(v).to(torch.int32) + zp[:, None], 0, qmax)
    q = torch.where(finite[:, None], q, torch.zeros_like(q)).to(torch.uint8)
    return q, scale, zp, ~finite


def q8_accumulate_ref(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulators sum_k q[m,k] * w[n,k] (computed in int64)."""
    return q.to(torch.int64) @ w.to(torch.int64).t()


# GELU's piecewise polynomial for E(u) = Phi(-u): row j holds the coefficient of t**j on each of the
# 8 intervals. Derived by bench/gelu_coefficients.py (float64 least squares on Chebyshev nodes,
# relative weights, rounded to float32); the same table as gelu_c::kTable in epilogue_math.h.
_GELU_SCALE, _GELU_MAX_INDEX = 1.125, 7.0
_GELU_TABLE = (
    (0.5, 0.187031403, 0.0377201773, 0.00383038074, 0.000188590624, 4.40598069e-06, 4.82153979e-08, 0.0),
    (-0.35461536, -0.238882527, -0.0730239227, -0.0101297572, -0.000637656369, -1.82156218e-05, -2.36164865e-07, 0.0),
    (1.10906242e-07, 0.0943730697, 0.0576980971, 0.0120056123, 0.00100765168, 3.59804471e-05, 5.59593673e-07, 0.0),
    (0.0466966406, 0.00660179509, -0.0207752064, -0.00815228373, -0.000977631658, -4.49568033e-05, -8.50956894e-07, 0.0),
    (1.24101334e-05, -0.0137260761, 0.000605136564, 0.00325081078, 0.000639876409, 3.96448522e-05, 9.34881825e-07, 0.0),
    (-0.00558348466, 0.00138989894, 0.0022635099, -0.000571833167, -0.000288237265, -2.62635058e-05, -8.10426855e-07, 0.0),
    (0.000101577119, 0.00122529629, -0.000630033785, -0.000123104881, 8.33291924e-05, 1.34461725e-05, 5.66131291e-07, 0.0),
    (0.000427306222, -0.000269911892, -5.19857931e-05, 8.60280488e-05, -1.11374911e-05, -4.32858724e-06, -2.33907642e-07, 0.0),
)


def gelu_spec(v: torch.Tensor) -> torch.Tensor:
    """The kernels' GELU, step by step in float32 (csrc/common/epilogue_math.h).

    GELU(x) = x * Phi(x); E(u) = Phi(-u) for u = |x| is a degree-7 polynomial in t = s - round(s),
    s = min(u * 9/8, 7), with the coefficients of interval round(s); interval 7 (|x| >= 5.78) is zero,
    so GELU saturates to x (x > 0) and -0 (x < 0). Every op is one float32 rounding, no FMA.
    """
    f = lambda c: torch.tensor(c, dtype=_F32)  # noqa: E731
    table = torch.tensor(_GELU_TABLE, dtype=_F32)
    s = v.abs() * f(_GELU_SCALE)
    s = torch.where(s < f(_GELU_MAX_INDEX), s, f(_GELU_MAX_INDEX))  # NaN -> 7, like _mm*_min_ps(s, 7)
    n = torch.round(s)
    t = s - n
    idx = n.to(torch.int64)
    e = table[-1][idx]
    for coefficients in reversed(table[:-1]):
        e = e * t + coefficients[idx]
    phi = torch.where(v >= 0, f(1.0) - e, e)
    return v * phi


def gelu_exact(v: torch.Tensor) -> torch.Tensor:
    """GELU in float64 with the true erf (the accuracy target)."""
    v = v.to(torch.float64)
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def int8_linear_ref(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    static: tuple[float, int] | None = None,
    act_bits: int = 8,
) -> torch.Tensor:
    """The int8 linear, bit-exact: x float32 [..., K], w_q int8 [N, K], w_scale float32 [N]."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    q, scale, zp, nonfinite = quantize_rows_ref(x2, static, act_bits)
    acc = q8_accumulate_ref(q, w_q)
    col_sum = w_q.to(torch.int64).sum(dim=1)
    corrected = (acc - zp.to(torch.int64)[:, None] * col_sum[None, :]).to(_F32)
    y = corrected * (scale[:, None] * w_scale.to(_F32)[None, :])
    if bias is not None:
        y = y + bias.to(_F32)[None, :]
    if activation == "relu":
        y = torch.where(y > 0, y, torch.zeros_like(y))
    elif activation == "gelu":
        y = gelu_spec(y)
    elif activation != "none":
        raise ValueError(f"unknown activation {activation!r}")
    y = torch.where(nonfinite[:, None], torch.full_like(y, float("nan")), y)
    return y.reshape(*x.shape[:-1], w_q.shape[0])

