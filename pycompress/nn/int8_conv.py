"""Int8Conv2d: a Conv2d (groups=1) on the int8 GEMM kernel.

The convolution is lowered to one GEMM, ``[N*Ho*Wo, kh*kw*C] @ [kh*kw*C, O]``:
- 1x1, stride 1, no padding: the NHWC view of the input is already the GEMM's A matrix
  (no copy when the input is channels_last, which is what this module returns);
- otherwise im2col in NHWC order, rows ``[N*Ho*Wo, kh*kw*C]`` whose innermost run is the C
  contiguous channels. Eager int8 calls never build it in float: the kernel
  (``q8_conv2d_nhwc``, csrc/q8/q8_gemm.h ``Im2col``) quantizes each row straight from the
  NHWC input, padding included. Traced calls (torch.compile / export) and sparse GEMMs pad
  once, take a strided window *view* of the padded input and copy it once into the rows
  (unfold-then-transpose in NCHW order would copy twice and read the input with stride W in
  the inner loop); both give the same rows, hence the same numbers.
The weight is reordered to (O, kh, kw, C) to match, quantized per output channel and
packed once by ``Int8Linear``. The output is returned as an NCHW tensor with channels_last
memory, so the next convolution's im2col reads it without a layout change.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from pycompress.nn.int8_linear import Int8Linear
from pycompress.ops.q8 import int8_conv2d_nhwc_cpu
from pycompress.reference.q8 import pack_int8_weights


def int8_linear_from_weight(weight: torch.Tensor, bias: torch.Tensor | None, *, weight_scale: torch.Tensor | None = None,
                            name: str | None = None, **kwargs) -> Int8Linear:
    """Int8Linear for a 2-D float weight; ``weight_scale`` [out] uses a calibrated per-channel scale
    (from ``pycompress.quantize``) instead of the max-abs one ``Int8Linear.from_float`` computes."""
    gemm = Int8Linear.from_float(SimpleNamespace(weight=weight, bias=bias), name=name, **kwargs)
    if weight_scale is None:
        return gemm
    label = name or "Int8Linear"
    scale = torch.as_tensor(weight_scale, dtype=torch.float32).detach().cpu().reshape(-1)
    if scale.numel() != weight.shape[0]:
        raise ValueError(f"{label}: weight_scale has {scale.numel()} entries, weight has {weight.shape[0]} output channels")
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"{label}: weight_scale must be finite and > 0")
    qmax = 2 ** (gemm.weight_bits - 1) - 1
    q = torch.clamp(torch.round(weight.detach().float().cpu() / scale[:, None]), -qmax, qmax).to(torch.int8)
    packed, col_sum = pack_int8_weights(q)
    gemm.w_packed.copy_(packed)
    gemm.col_sum.copy_(col_sum)
    gemm.w_scale.copy_(scale)
    return gemm


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d_unsupported_reason(conv: nn.Conv2d) -> str | None:
    """Why Int8Conv2d cannot run this convolution, or None when it can."""
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels == conv.out_channels else "grouped"
        return (f"{kind} conv (groups={conv.groups}): the int8 GEMM lowering needs groups=1; "
                "a per-group GEMM would be too small to beat float")
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: only zero padding is lowered"
    if isinstance(conv.padding, str) and conv.padding == "same":
        kh, kw = _pair(conv.kernel_size)
        dh, dw = _pair(conv.dilation)
        if (dh * (kh - 1)) % 2 or (dw * (kw - 1)) % 2:
            return "padding='same' with an even receptive field needs asymmetric padding"
    return None


def _resolve_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        kh, kw = _pair(conv.kernel_size)
        dh, dw = _pair(conv.dilation)
        return (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    return _pair(conv.padding)


class Im2colConv2d(nn.Module):
    """A groups=1 Conv2d lowered to one GEMM module ``gemm`` that maps [M, K] -> [M, O] with
    K = kh*kw*C in (kh, kw, C) order. ``Int8Conv2d`` is this with an ``Int8Linear``; a sparse
    Linear module plugs in the same way (``from_gemm``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 gemm: nn.Module | None = None, name: str | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        for field in ("kernel_size", "stride", "dilation"):
            if min(getattr(self, field)) < 1:
                raise ValueError(f"{type(self).__name__}({name}): {field}={getattr(self, field)} must be >= 1")
        if min(self.padding) < 0:
            raise ValueError(f"{type(self).__name__}({name}): padding={self.padding} must be >= 0")
        self.gemm = gemm
        self._name = name
        self._pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    @property
    def gemm_in_features(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1] * self.in_channels

    @property
    def name(self) -> str | None:
        return self._name

    @name.setter
    def name(self, value: str | None) -> None:
        self._name = value
        if self.gemm is not None and hasattr(self.gemm, "name"):
            self.gemm.name = value

    @staticmethod
    def gemm_weight(conv: nn.Conv2d) -> torch.Tensor:
        """The conv weight as the GEMM's [O, kh*kw*C] matrix (a parametrized conv gives its masked weight)."""
        return conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.out_channels, -1)

    @classmethod
    def from_gemm(cls, conv: nn.Conv2d, gemm: nn.Module, name: str | None = None) -> "Im2colConv2d":
        reason = conv2d_unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"{cls.__name__}.from_gemm({name or 'Conv2d'}): {reason}")
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, _resolve_padding(conv),
                  conv.dilation, gemm=gemm, name=name)
        mod.name = name
        return mod

    def _label(self) -> str:
        kind = type(self).__name__
        return f"{kind}({self.name})" if self.name else f"{kind}({self.in_channels}->{self.out_channels})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self._label()}: input has shape {tuple(x.shape)}, "
                             f"expected (N, {self.in_channels}, H, W)")
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        ho, wo = (h + 2 * ph - span_h) // sh + 1, (w + 2 * pw - span_w) // sw + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"{self._label()}: input {h}x{w} with padding {self.padding} is smaller than the "
                             f"{span_h}x{span_w} receptive field")
        nhwc = x.permute(0, 2, 3, 1)
        gemm = self.gemm
        if (not self._pointwise and type(gemm) is Int8Linear and type(x) is torch.Tensor and x.is_cpu
                and x.dtype == torch.float32 and not torch.compiler.is_compiling()):
            # Eager CPU int8: the kernel quantizes the im2col rows straight from x, so the float
            # im2col copy (4x the bytes of its uint8 rows) is never written. Same numbers as below.
            if nhwc.stride(3) != 1 and self.in_channels != 1:
                if kh == kw == 1 and ph == pw == 0 and (sh > 1 or sw > 1):
                    # A strided 1x1 conv (a ResNet downsample) reads every sh-th row and sw-th column
                    # only: copy just those to channels-last (1/4 of x for stride 2; the whole NCHW
                    # x of ResNet-18's layer2 downsample at batch 16 took 3.4 of its 5.6 ms).
                    x, sh, sw = x[:, :, ::sh, ::sw], 1, 1
                nhwc = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
            b = gemm._buffers
            y = int8_conv2d_nhwc_cpu(nhwc, (kh, kw, sh, sw, ph, pw, dh, dw), b["w_packed"], b["col_sum"],
                                     b["w_scale"], b["bias"], gemm._act_code, gemm.act_scale, gemm.act_zero_point)
            return y.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)
        if self._pointwise:
            cols = nhwc.reshape(n * h * w, self.in_channels)
        else:
            padded = F.pad(nhwc, (0, 0, pw, pw, ph, ph)) if (ph or pw) else nhwc
            # [N, Ho, Wo, C, span_h, span_w] window view -> dilation -> (kh, kw, C) innermost order.
            win = padded.unfold(1, span_h, sh).unfold(2, span_w, sw)[..., ::dh, ::dw]
            cols = win.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * self.in_channels)
        y = self.gemm(cols)
        return y.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.gemm.buffers())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, "
                f"lowering={'gemm' if self._pointwise else 'im2col+gemm'}")


class Int8Conv2d(Im2colConv2d):
    """Conv2d with int8 weights (symmetric, per output channel) and uint8 activations
    (dynamic per output pixel, or a calibrated static scale / zero point), groups=1.

    The packed GEMM operands live in the ``gemm`` submodule (an ``Int8Linear``), so
    ``state_dict`` holds ``gemm.w_packed``, ``gemm.col_sum``, ``gemm.w_scale``, ``gemm.bias``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, activation: str = "none", act_scale: float | None = None,
                 act_zero_point: int = 0, weight_bits: int = 8, name: str | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, name=name)
        self.gemm = Int8Linear(self.gemm_in_features, out_channels, bias=bias, activation=activation,
                               act_scale=act_scale, act_zero_point=act_zero_point, weight_bits=weight_bits, name=name)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, activation: str = "none", act_scale: float | None = None,
                   act_zero_point: int = 0, weight_bits: int = 8, name: str | None = None,
                   weight_scale: torch.Tensor | None = None) -> "Int8Conv2d":
        reason = conv2d_unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"Int8Conv2d.from_float({name or 'Conv2d'}): {reason}")
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, _resolve_padding(conv),
                  conv.dilation, bias=conv.bias is not None, activation=activation, act_scale=act_scale,
                  act_zero_point=act_zero_point, weight_bits=weight_bits, name=name)
        mod.gemm = int8_linear_from_weight(cls.gemm_weight(conv), conv.bias, weight_scale=weight_scale, name=name,
                                           activation=activation, act_scale=act_scale,
                                           act_zero_point=act_zero_point, weight_bits=weight_bits)
        return mod

    def extra_repr(self) -> str:
        g = self.gemm
        acts = "dynamic per-pixel" if g.act_scale is None else f"static scale={g.act_scale:.4g} zp={g.act_zero_point}"
        return (f"{super().extra_repr()}, bias={g.bias is not None}, weights=int{g.weight_bits} per-channel, "
                f"activations=uint8 {acts}, bytes={self.packed_bytes()}")
