"""Reference for Int8Conv2d: an independent im2col (torch's F.unfold, NCHW order) feeding the
bit-exact int8 linear reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pycompress.reference.q8 import int8_linear_ref


def int8_conv2d_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    stride=(1, 1), padding=(0, 0), dilation=(1, 1), static: tuple[float, int] | None = None) -> torch.Tensor:
    """x float32 [N, C, H, W], w_q int8 [O, C, kh, kw] (groups=1), w_scale float32 [O] -> float32 [N, O, Ho, Wo]."""
    n, c, h, w = x.shape
    o, _, kh, kw = w_q.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, C*kh*kw, L]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    # The kernel quantizes each output pixel's patch as one row; the sum over k is exact in
    # integers, so the patch order (C, kh, kw) here vs (kh, kw, C) in the kernel does not matter.
    rows = cols.transpose(1, 2).reshape(n * ho * wo, c * kh * kw)
    y = int8_linear_ref(rows, w_q.reshape(o, -1), w_scale, bias, static=static)
    return y.view(n, ho, wo, o).permute(0, 3, 1, 2)
