"""Float64 reference of torch.ops.pycompress.attention (csrc/attention/attention.h).

Same contract: bool-False and causally hidden keys score -inf, rows whose every
score is -inf give 0, NaN and +inf scores make their row NaN (IEEE arithmetic).
"""

from __future__ import annotations

import math

import torch


def attention_ref(q, k, v, mask=None, is_causal=False, scale=None, dtype=torch.float64) -> torch.Tensor:
    """out[B, Sq, H, Dv], computed in `dtype` (float64: the accuracy target; float32: the
    same math at the kernel's precision, whose error sets the tests' tolerance)."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    sq, sk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = scale * (q @ k.transpose(-1, -2))
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.to(dtype)
    if is_causal:
        hidden = torch.ones(sq, sk, dtype=torch.bool).triu(1)
        s = s.masked_fill(hidden, -math.inf)
    m = s.amax(dim=-1, keepdim=True) if sk > 0 else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)  # fully masked rows: every p is 0
    p = torch.exp(s - m)
    total = p.sum(dim=-1, keepdim=True)
    out = (p @ v) / total
    out = torch.where(total == 0, torch.zeros_like(out), out)
    return out.transpose(1, 2).contiguous()
