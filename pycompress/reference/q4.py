"""Reference for the 4-bit-weight linear, W4A8 (csrc/q4/q4_gemm.h states the contract).

Weights: 2..4-bit symmetric integers q in [-8, 7], one float32 scale per output channel and group of
``group_size`` consecutive k (``group_size=None``: one group, per channel), stored as the unsigned nibble
q + 8, two a byte (a nibble is then directly an unsigned-times-signed dot product operand). Activations: the int8 linear's unsigned per-row (dynamic)
or static quantization (``quantize_rows_ref``). Each group's products are summed exactly in
integers; the float32 epilogue below is the contract's operation order, one IEEE operation a
step, so the reference reproduces the kernels bit for bit.
"""

from __future__ import annotations

import torch

from pycompress.reference.q8 import PANEL, gelu_spec, quantize_rows_ref, round_up

KBLOCK = 8  # k values per packed 64-byte block of a panel: low nibbles k 0-3, high nibbles k 4-7
GROUP_SIZES = (32, 64, 128)  # the grouped sizes the kernels are built for; None = per channel
W4_BITS = (2, 3, 4)  # weight widths stored packed as nibbles

_F32 = torch.float32


def group_count(k: int, group_size: int | None) -> int:
    """Groups along K: K / group_size, or 1 per channel (the group is then round_up(K, 8))."""
    return 1 if group_size is None else k // group_size


def check_group_size(k: int, group_size: int | None, what: str) -> None:
    """Refuses a group size the format cannot hold, naming ``what`` (a layer), K and the rule."""
    if group_size is None:
        return
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0 or group_size % KBLOCK:
        raise ValueError(f"{what}: group_size must be None (per channel) or a positive multiple of {KBLOCK}, "
                         f"got {group_size!r}")
    if k % group_size:
        raise ValueError(f"{what}: group_size={group_size} does not divide in_features={k}; use a group size "
                         f"that divides it or group_size=None (per channel)")


def quantize_weight_grouped(weight: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                            scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization per (output channel, group of K): w ~ q * scale[n, g],
    q = clamp(round(w / scale), -(2^(b-1)-1), 2^(b-1)-1), scale = max|w over the group| / qmax (1 for an
    all-zero group), or the given ``scale`` [N, groups] (GPTQ's).

    Returns (q int8 [N, K], scale float32 [N, groups]); ``group_size=None`` is per channel, the same
    numbers as ``quantize_weight_per_channel``.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be in [2, 8], got {bits}")
    w = weight.detach().to(_F32)
    n, k = w.shape
    check_group_size(k, group_size, "quantize_weight_grouped")
    g = group_count(k, group_size)
    qmax = 2 ** (bits - 1) - 1
    wg = w.reshape(n, g, k // g)
    if scale is None:
        amax = wg.abs().amax(dim=2)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    else:
        scale = scale.detach().to(_F32).reshape(n, g)
    q = torch.clamp(torch.round(wg / scale[:, :, None]), -qmax, qmax).to(torch.int8)
    return q.reshape(n, k), scale.contiguous()


def _padded_k(k: int) -> int:
    return round_up(k, KBLOCK)


def pack_int4_weights(q: torch.Tensor, scale: torch.Tensor, group_size: int | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 [N, K] in [-8, 7] and scale [N, groups] -> the kernel's operands:

    - w_packed uint8 [Np/16][Kp/8][16][4] (Np = round_up(N, 16), Kp = round_up(K, 8)): in block kb of
      panel p, byte (n, j) holds q[16p + n][8kb + j] + 8 in its low nibble and q[16p + n][8kb + 4 + j] + 8
      in its high nibble, so the low (high) nibbles of the 64 bytes are one vpdpbusd operand of 4 k by 16
      channels. Padding weights are 0 (nibble 8).
    - g_scale float32 [Np/16][groups][16]: the scales of a panel's 16 channels, group by group
      (padding channels 0).
    - corr float32 [Np]: sum over groups, in order from 0.0, of float(sum of the group's q) * scale
      (mul, then add: the zero point's share of the epilogue).
    """
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int4_weights: expected a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    check_group_size(k, group_size, "pack_int4_weights")
    g = group_count(k, group_size)
    if tuple(scale.shape) != (n, g):
        raise ValueError(f"pack_int4_weights: scale has shape {tuple(scale.shape)}, expected {(n, g)}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4_weights: weights leave the int4 range [-8, 7]")
    np_, kp = round_up(n, PANEL), _padded_k(k)
    padded = torch.zeros(np_, kp, dtype=torch.int16)
    padded[:n, :k] = q.to(torch.int16)
    nib = (padded + 8).view(np_ // PANEL, PANEL, kp // KBLOCK, 2, 4)  # [p, n, kb, half, j]
    byte = nib[:, :, :, 0, :] | (nib[:, :, :, 1, :] << 4)  # [p, n, kb, j]
    w_packed = byte.permute(0, 2, 1, 3).contiguous().to(torch.uint8).view(-1)
    s = torch.zeros(np_, g, dtype=_F32)
    s[:n] = scale.to(_F32)
    g_scale = s.view(np_ // PANEL, PANEL, g).permute(0, 2, 1).contiguous().view(-1)
    group_k = k // g if group_size is not None else kp
    sums = padded[:, : g * group_k].view(np_, g, group_k).sum(dim=2, dtype=torch.int32).to(_F32)
    corr = torch.zeros(np_, dtype=_F32)
    for gi in range(g):
        corr = corr + sums[:, gi] * s[:, gi]
    return w_packed, g_scale, corr


def unpack_int4_weights(w_packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The int8 [N, K] weights of a packed operand (inverse of pack_int4_weights' first output)."""
    np_, kp = round_up(n, PANEL), _padded_k(k)
    if w_packed.numel() != np_ * kp // 2:
        raise ValueError(f"packed int4 weights hold {w_packed.numel()} bytes, expected {np_ * kp // 2} "
                         f"for N={n}, K={k}")
    b = w_packed.view(torch.uint8).to(torch.int16).view(np_ // PANEL, kp // KBLOCK, PANEL, 4).permute(0, 2, 1, 3)
    lo, hi = b & 0xF, b >> 4
    nib = torch.stack((lo, hi), dim=3)  # [p, n, kb, half, j]
    full = (nib - 8).reshape(np_, kp)
    return full[:n, :k].to(torch.int8).contiguous()


def unpack_group_scales(g_scale: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    np_ = round_up(n, PANEL)
    return g_scale.view(np_ // PANEL, groups, PANEL).permute(0, 2, 1).reshape(np_, groups)[:n].contiguous()


def int4_linear_ref(
    x: torch.Tensor,
    w_q: torch.Tensor,
    scale: torch.Tensor,
    group_size: int | None,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    static: tuple[float, int] | None = None,
    act_bits: int = 8,
) -> torch.Tensor:
    """The W4A8 linear, bit-exact: x float32 [..., K], w_q int8 [N, K] in [-8, 7], scale [N, groups].

    Per row r and channel n, with acc[g] the exact sum of q_x * q_w over group g:
      facc = 0; for each g in order: facc = facc + float(acc[g]) * scale[n, g]
      v = (facc - float(zp[r]) * corr[n]) * row_scale[r]; v = v + bias[n]; v = act(v).
    """
    k = x.shape[-1]
    n = w_q.shape[0]
    x2 = x.reshape(-1, k)
    g = group_count(k, group_size)
    _, _, corr = pack_int4_weights(w_q, scale, group_size)
    q, row_scale, zp, nonfinite = quantize_rows_ref(x2, static, act_bits)
    gk = k // g
    xq = q.to(torch.int64).view(-1, g, gk)
    wq = w_q.to(torch.int64).view(n, g, gk)
    s = scale.to(_F32)
    facc = torch.zeros(x2.shape[0], n, dtype=_F32)
    for gi in range(g):
        acc = (xq[:, gi, :] @ wq[:, gi, :].t()).to(_F32)
        facc = facc + acc * s[None, :, gi]
    y = facc - zp.to(_F32)[:, None] * corr[None, :n]
    y = y * row_scale[:, None]
    if bias is not None:
        y = y + bias.to(_F32)[None, :]
    if activation == "relu":
        y = torch.where(y > 0, y, torch.zeros_like(y))
    elif activation == "gelu":
        y = gelu_spec(y)
    elif activation != "none":
        raise ValueError(f"unknown activation {activation!r}")
    y = torch.where(nonfinite[:, None], torch.full_like(y, float("nan")), y)
    return y.reshape(*x.shape[:-1], n)
