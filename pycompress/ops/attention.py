"""torch.ops.pycompress.attention: out = softmax(scale * q k^T + mask) v, fused, on CPU (on CUDA through torch's
scaled_dot_product_attention, attention_sdpa).

q [B, H, Sq, D], k [B, H, Sk, D], v [B, H, Sk, Dv], float32, any strides whose last
dim is contiguous (other inputs are copied first). The result is [B, Sq, H, Dv]
contiguous: the layout a transformer's output projection reads after its
transpose, so no copy follows. ``mask`` is None, additive float32 or bool
(True = attend), broadcastable to [B, H, Sq, Sk]; ``is_causal`` lets query i see
keys j <= i (top-left aligned, as torch's SDPA) and may be combined with a mask.
``scale`` defaults to 1/sqrt(D).

Rows whose every key is masked give 0, as torch.nn.functional.scaled_dot_product_attention
does; NaN/Inf behaviour and the numbers of each ISA path: csrc/attention/attention.h.
"""

from __future__ import annotations

import math

import torch

from pycompress import _C
from pycompress._native import num_threads
from pycompress.ops._library import LIB

LIB.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None, bool is_causal=False, float? scale=None) -> Tensor")

MASK_NONE, MASK_ADDITIVE, MASK_BOOL = 0, 1, 2


def _check(q, k, v, mask, scale) -> tuple[int, int, int, int, int, int, float]:
    """Validates shapes, dtypes and devices; returns (B, H, Sq, Sk, D, Dv, scale).

    Plain comparisons, not torch._check: this runs on every eager call.
    """
    f32 = torch.float32
    if not (q.dtype == f32 and k.dtype == f32 and v.dtype == f32 and q.dim() == 4 and k.dim() == 4 and v.dim() == 4):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dtype != f32:
                raise TypeError(f"attention: {name} must be float32, got {t.dtype}")
            if t.dim() != 4:
                raise ValueError(f"attention: {name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    b, h, sq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"attention: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != h or v.shape[1] != h:
        raise ValueError(f"attention: q has {h} heads but k has {k.shape[1]} and v {v.shape[1]}; grouped-query "
                         "attention (fewer k/v heads) is not supported: repeat k/v heads first")
    sk = k.shape[2]
    if v.shape[2] != sk:
        raise ValueError(f"attention: k has {sk} keys but v has {v.shape[2]} (shapes {tuple(k.shape)}, {tuple(v.shape)})")
    if k.shape[3] != d:
        raise ValueError(f"attention: q head dim {d} differs from k head dim {k.shape[3]}")
    dv = v.shape[3]
    if d < 1 or dv < 1:
        raise ValueError(f"attention: head dims must be >= 1, got D={d}, Dv={dv}")
    if mask is not None:
        if mask.dtype not in (torch.bool, torch.float32):
            raise TypeError(f"attention: mask must be bool (True = attend) or additive float32, got {mask.dtype}")
        if mask.dim() > 4 or any(m not in (1, t) for m, t in zip(reversed(mask.shape), (sk, sq, h, b))):
            raise ValueError(f"attention: mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"[batch, heads, Sq, Sk] = {[b, h, sq, sk]}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")
    return b, h, sq, sk, d, dv, scale


@torch.library.register_fake("pycompress::attention")
def _attention_fake(q, k, v, mask=None, is_causal=False, scale=None):
    b, h, sq, _, _, dv, _ = _check(q, k, v, mask, scale)
    return q.new_empty((b, sq, h, dv))


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def attention_cpu(q, k, v, mask=None, is_causal=False, scale=None):
    """The CPU kernel behind the op, callable directly on eager CPU tensors (no dispatcher)."""
    b, h, sq, sk, d, dv, scale = _check(q, k, v, mask, scale)
    if not (q.is_cpu and k.is_cpu and v.is_cpu and (mask is None or mask.is_cpu)):
        devices = {name: str(t.device) for name, t in (("q", q), ("k", k), ("v", v), ("mask", mask)) if t is not None}
        raise ValueError(f"attention: the fused attention kernel runs on CPU, got devices {devices}")
    out = torch.empty((b, sq, h, dv), dtype=torch.float32)
    if b * sq * h == 0:
        return out
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    kind, mask_ptr, mask_strides = MASK_NONE, 0, (0, 0, 0, 0)
    if mask is not None:
        kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADDITIVE
        m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
        # A broadcast dim is read with stride 0, whatever stride the tensor gives it.
        mask_strides = tuple(0 if size == 1 else stride for size, stride in zip(m4.shape, m4.stride()))
        mask_ptr = m4.data_ptr()
    _C.attention(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
        k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
        b, h, sq, sk, d, dv, kind, mask_ptr, *mask_strides, bool(is_causal), float(scale), out.data_ptr(),
        num_threads(),
    )
    return out


def attention_sdpa(q, k, v, mask=None, is_causal=False, scale=None):
    """The op on any device through torch's scaled_dot_product_attention (the CUDA implementation: flash /
    memory-efficient / math kernels as torch picks them), with the op's layout and rules: [B, Sq, H, Dv] out, a
    mask combined with ``is_causal`` (SDPA takes one or the other), fully masked rows (and Sk = 0) giving 0
    whichever backend runs. Float32 like the CPU kernel; they agree to fp32 rounding, not bit for bit."""
    b, h, sq, sk, d, dv, scale = _check(q, k, v, mask, scale)
    devices = {t.device for t in (q, k, v) + (() if mask is None else (mask,))}
    if len(devices) > 1:
        names = {name: str(t.device) for name, t in (("q", q), ("k", k), ("v", v), ("mask", mask)) if t is not None}
        raise ValueError(f"attention: q, k, v and mask must be on one device, got {names}")
    if b * sq * h == 0 or sk == 0:
        return q.new_zeros((b, sq, h, dv))
    if mask is not None and mask.dim() < 4:  # SDPA broadcasts masks of 2 or more dims only
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    visible = None  # bool, broadcastable to [B, H, Sq, Sk]: which keys each query may see
    if mask is not None:
        visible = mask if mask.dtype == torch.bool else mask != float("-inf")
    if is_causal:
        causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        visible = causal if visible is None else visible & causal
    attn_mask = mask
    if is_causal and mask is not None:  # both apply: hide the causally hidden keys in the mask itself
        attn_mask = visible if mask.dtype == torch.bool else mask.masked_fill(~visible, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal and mask is None, scale=scale)
    if visible is not None:
        out = out.masked_fill(~visible.any(-1, keepdim=True), 0.0)
    return out.transpose(1, 2).contiguous()


LIB.impl("attention", attention_cpu, "CPU")
LIB.impl("attention", attention_sdpa, "CUDA")


def attention(q, k, v, mask=None, is_causal=False, scale=None):
    """softmax(scale * q k^T + mask) v as [B, Sq, H, Dv]; see the module docstring."""
    return torch.ops.pycompress.attention(q, k, v, mask, is_causal, scale)
