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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pycompress.nn.checks import check_packed_size, geometry_problems, raise_problems
from pycompress.nn.int8_linear import Int8Linear
from pycompress.nn.registry import (
    LAYER_TYPES,
    CompressedLayer,
    Format,
    QuantParams,
    float_kind,
    half_on_cpu,
    register_format,
    register_layer,
)
from pycompress.ops.q8 import int8_conv2d_nhwc_cpu


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


@register_layer
class Im2colConv2d(CompressedLayer):
    """A groups=1 Conv2d lowered to one GEMM module ``gemm`` that maps [M, K] -> [M, O] with
    K = kh*kw*C in (kh, kw, C) order. ``Int8Conv2d`` is this with an ``Int8Linear``; a sparse
    Linear module plugs in the same way (``from_gemm``; its class sets ``LOWERS_CONV``)."""

    FLOAT_KIND = "Conv2d"

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
        if x.dtype is not torch.float32 and half_on_cpu(x):
            return self.forward(x.float()).to(x.dtype)
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
                                     b["w_scale"], b["bias"], gemm._act_code, gemm.act_scale, gemm.act_zero_point,
                                     gemm.act_bits)
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

    # ---------------------------------------------------------------- the format: the GEMM's, lowered

    @property
    def format_name(self) -> str:
        return self.gemm.format_name

    @property
    def weight_bits(self) -> int:
        return self.gemm.weight_bits

    @property
    def act_bits(self) -> int:
        return getattr(self.gemm, "act_bits", 8)

    @property
    def activation(self) -> str:
        return self.gemm.activation

    def fuses_activation(self) -> bool:
        return self.gemm.fuses_activation()

    def set_activation(self, activation: str) -> None:
        self.gemm.set_activation(activation)

    def kernel_name(self) -> str:
        return self.gemm.kernel_name()

    def geometry(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation)}

    def config(self) -> dict:
        # The geometry here, the GEMM module's own entry inside.
        return {**self.geometry(), "name": self.name,
                "gemm": {"type": type(self.gemm).__name__, "config": self.gemm.config()}}

    @classmethod
    def from_config(cls, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> "Im2colConv2d":
        lowering = tuple(name for name, c in LAYER_TYPES.items() if c.LOWERS_CONV)
        gemm_entry = cfg.get("gemm")
        if not (isinstance(gemm_entry, dict) and gemm_entry.get("type") in lowering
                and isinstance(gemm_entry.get("config"), dict)):
            raise ValueError(f"load: layer {where}: a lowered conv needs a 'gemm' entry of type {lowering}")
        gemm_cls = LAYER_TYPES[gemm_entry["type"]]
        problems = geometry_problems(cfg) + gemm_cls.config_problems(gemm_entry["config"])
        if not isinstance(cfg.get("name"), (str, type(None))):
            problems.append("name must be a string or null")
        raise_problems(problems, where)
        k = cfg["in_channels"] * cfg["kernel_size"][0] * cfg["kernel_size"][1]
        gemm = gemm_cls.from_config(gemm_entry["config"], tensors, prefix + "gemm.", where,
                                    shape=(k, cfg["out_channels"]))
        return cls(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                   tuple(cfg["padding"]), tuple(cfg["dilation"]), gemm=gemm, name=cfg.get("name"))

    def validate_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
        self.gemm.validate_tensors(tensors, prefix + "gemm.", where)

    def entropy_coded_keys(self) -> list[str]:
        return ["gemm." + key for key in self.gemm.entropy_coded_keys()]

    def integer_weight_modules(self) -> list[tuple[str, CompressedLayer]]:
        return [("gemm." + rel, m) for rel, m in self.gemm.integer_weight_modules()]

    def pruned_bytes(self) -> int | None:
        return self.gemm.pruned_bytes()

    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def dequantized_weight(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        # The GEMM's K order is (kh, kw, C) (gemm_weight).
        return self.gemm.dequantized_weight().view(self.out_channels, kh, kw, self.in_channels).permute(0, 3, 1, 2)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.gemm.bias

    groups = 1
    padding_mode = "zeros"

    def matches_float(self, layer: nn.Module) -> bool:
        return ((layer.in_channels, layer.out_channels, tuple(layer.kernel_size))
                == (self.in_channels, self.out_channels, self.kernel_size))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, "
                f"lowering={'gemm' if self._pointwise else 'im2col+gemm'}")


@register_layer
class Int8Conv2d(Im2colConv2d):
    """Conv2d with int8 weights (symmetric, per output channel) and uint8 activations
    (dynamic per output pixel, or a calibrated static scale / zero point), groups=1.

    The packed GEMM operands live in the ``gemm`` submodule (an ``Int8Linear``), so
    ``state_dict`` holds ``gemm.w_packed``, ``gemm.col_sum``, ``gemm.w_scale``, ``gemm.bias``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, activation: str = "none", act_scale: float | None = None,
                 act_zero_point: int = 0, weight_bits: int = 8, name: str | None = None, act_bits: int = 8) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, name=name)
        self.gemm = Int8Linear(self.gemm_in_features, out_channels, bias=bias, activation=activation,
                               act_scale=act_scale, act_zero_point=act_zero_point, weight_bits=weight_bits, name=name,
                               act_bits=act_bits)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, activation: str = "none", act_scale: float | None = None,
                   act_zero_point: int = 0, weight_bits: int = 8, name: str | None = None,
                   weight_scale: torch.Tensor | None = None, act_bits: int = 8) -> "Int8Conv2d":
        reason = conv2d_unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"Int8Conv2d.from_float({name or 'Conv2d'}): {reason}")
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, _resolve_padding(conv),
                  conv.dilation, bias=conv.bias is not None, activation=activation, act_scale=act_scale,
                  act_zero_point=act_zero_point, weight_bits=weight_bits, name=name, act_bits=act_bits)
        mod.gemm = Int8Linear.from_weight(cls.gemm_weight(conv), conv.bias, weight_scale=weight_scale, name=name,
                                          activation=activation, act_scale=act_scale,
                                          act_zero_point=act_zero_point, weight_bits=weight_bits, act_bits=act_bits)
        return mod

    def kernel_name(self) -> str:
        return ("1x1 as GEMM + " if self._pointwise else "im2col + ") + self.gemm.kernel_name()

    def config(self) -> dict:
        cfg = {k: v for k, v in self.gemm.config().items() if k not in ("in_features", "out_features")}
        return {**cfg, **self.geometry()}

    @classmethod
    def from_config(cls, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> "Int8Conv2d":
        raise_problems(Int8Linear.config_problems(cfg) + geometry_problems(cfg), where)
        k = cfg["in_channels"] * cfg["kernel_size"][0] * cfg["kernel_size"][1]
        check_packed_size(k, cfg["out_channels"], tensors.get(prefix + "gemm.w_packed"), where)
        common = {k: cfg.get(k) for k in ("bias", "activation", "act_scale", "act_zero_point", "weight_bits", "name")}
        return cls(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                   tuple(cfg["padding"]), tuple(cfg["dilation"]), **common,
                   act_bits=cfg.get("act_bits", 8))  # files before u7 hold no act_bits

    def extra_repr(self) -> str:
        g = self.gemm
        acts = "dynamic per-pixel" if g.act_scale is None else f"static scale={g.act_scale:.4g} zp={g.act_zero_point}"
        return (f"{super().extra_repr()}, bias={g.bias is not None}, weights=int{g.weight_bits} per-channel, "
                f"activations=uint{g.act_bits} {acts}, bytes={self.packed_bytes()}")


def build_lowered(layer: nn.Module, name: str | None,
                  build_gemm: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]) -> CompressedLayer:
    """A format's layer for a float Linear or Conv2d from ``build_gemm(weight [N, K], bias)``: a conv is
    lowered onto that GEMM module (``Im2colConv2d``)."""
    bias = layer.bias.detach() if layer.bias is not None else None
    if float_kind(layer) == "Conv2d":
        return Im2colConv2d.from_gemm(layer, build_gemm(Im2colConv2d.gemm_weight(layer), bias), name=name)
    return build_gemm(layer.weight.detach(), bias)


def _build_int8(layer: nn.Module, name: str | None, quant: QuantParams) -> CompressedLayer:
    kwargs = {"weight_bits": quant.weight_bits, "weight_scale": quant.weight_scale, "act_bits": quant.act_bits}
    if quant.act_scale is not None:
        kwargs.update(act_scale=quant.act_scale, act_zero_point=quant.act_zero_point)
    if float_kind(layer) == "Conv2d":
        return Int8Conv2d.from_float(layer, name=name, **kwargs)
    bias = layer.bias.detach() if layer.bias is not None else None
    return Int8Linear.from_weight(layer.weight.detach(), bias, name=name, **kwargs)


register_format(Format("int8-dynamic", True, _build_int8, "Int8Linear / Int8Conv2d, activations quantized per row "
                                                           "at run time"))
register_format(Format("int8-static", True, _build_int8, "the same with pycompress.quantize's calibrated activation "
                                                          "scale / zero point"))
