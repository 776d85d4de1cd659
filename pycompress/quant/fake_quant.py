"""Fake quantization with straight-through estimators, in the kernels' number formats.

Weights: a ``torch.nn.utils.parametrize`` parametrization (``WeightFakeQuant``) on
``weight``, registered after any pruning mask, that rounds each output channel (or each group of
``group_size`` consecutive k of it) to ``bits``-bit symmetric integers,
``q = clamp(round(w / scale), -qmax, qmax)`` with ``pycompress.reference.q8.quantize_weight_per_channel``
or ``pycompress.reference.q4.quantize_weight_grouped`` (the calls convert makes), and passes gradients
straight through. ``scale`` is max|w| / qmax of the channel or group, or a fixed ``scale`` buffer
(GPTQ's). A grouped Conv2d's groups run along the kernels' im2col K order ``(kh, kw, in)``.

Activations: ``ActivationFakeQuant``, a submodule ``activation_fake_quant`` of the
quantized layer applied to its input by a forward pre-hook: uint8 with a zero point,
``q = clamp(round(x / scale) + zp, 0, 255)``, static (one calibrated scale / zero
point) or dynamic (per row, computed from each row's range, as the kernels do). A Conv2d's dynamic rows are
its im2col rows (each output position's receptive field, zero padding included), as the int8 conv kernels
quantize them: that layer computes through ``im2col_conv_forward`` (``F.unfold``, the rows fake-quantized, a
GEMM) in place of its ``_conv_forward``, with no pre-hook.
The straight-through estimator is clipped for static ranges: gradient 1 inside the
representable range, 0 outside.
"""

from __future__ import annotations

import torch
from torch import nn

from pycompress.calibration import conv_im2col
from pycompress.quant.observers import affine_qparams, fake_quantize_affine
from pycompress.reference.q4 import quantize_weight_grouped
from pycompress.reference.q8 import quantize_weight_per_channel

_F32 = torch.float32
_FLT_MIN = torch.finfo(torch.float32).tiny


def weight_matrix(weight: torch.Tensor, grouped: bool) -> torch.Tensor:
    """A layer weight as the 2-D ``[N, K]`` matrix its integers are defined on: ``weight.reshape(N, -1)``,
    except a grouped Conv2d, whose K runs in the kernels' im2col order ``(kh, kw, in)`` so that each
    group is contiguous there."""
    if grouped and weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1)


def weight_from_matrix(w2: torch.Tensor, shape: torch.Size, grouped: bool) -> torch.Tensor:
    """Inverse of ``weight_matrix``."""
    if grouped and len(shape) == 4:
        n, c, kh, kw = shape
        return w2.reshape(n, kh, kw, c).permute(0, 3, 1, 2)
    return w2.reshape(shape)


class WeightFakeQuant(nn.Module):
    """weight -> q * scale, q = clamp(round(w / scale), -qmax, qmax), qmax = 2^(bits-1) - 1, per output
    channel (``group_size=None``) or per group of ``group_size`` consecutive k; straight-through gradient.

    ``scale`` (a buffer, None until set): fixed scales float32 [N, groups] (GPTQ's, with the weight
    already q * scale); None computes max|w| / qmax from the current weight on every forward."""

    def __init__(self, bits: int, group_size: int | None = None) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"weight_bits must be in [2, 8], got {bits}")
        self.bits = bits
        self.group_size = group_size
        self.register_buffer("scale", None)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [N, K], scale float32: [N] per channel, [N, groups] grouped) of a weight, K in
        ``weight_matrix`` order."""
        w2 = weight_matrix(weight.detach(), self.group_size is not None)
        if self.scale is None and self.group_size is None:
            return quantize_weight_per_channel(w2, self.bits)
        q, scale = quantize_weight_grouped(w2, self.bits, self.group_size, scale=self.scale)
        return q, (scale.reshape(-1) if self.group_size is None else scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q, scale = self.quantize(weight)
        s = scale.reshape(q.shape[0], -1)
        per_k = s.repeat_interleave(q.shape[1] // s.shape[1], dim=1)
        dequant = weight_from_matrix((q.to(_F32) * per_k).to(weight.dtype), weight.shape, self.group_size is not None)
        return weight + (dequant - weight).detach()

    def extra_repr(self) -> str:
        where = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        fixed = ", fixed scales" if self.scale is not None else ""
        return f"bits={self.bits}, {where} symmetric{fixed}"


def dynamic_fake_quantize_rows(rows: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-row dynamic uint8 quantization of a 2-D tensor, as the kernels' quantize_rows."""
    qmax = float(2 ** bits - 1)
    x = rows.detach().to(_F32)
    zero = torch.zeros(x.shape[0], dtype=_F32, device=x.device)
    lo = torch.minimum(x.amin(dim=1), zero)
    hi = torch.maximum(x.amax(dim=1), zero)
    scale = torch.clamp((hi - lo) / qmax, min=_FLT_MIN)
    inv = 1.0 / scale
    zp = torch.clamp(torch.round(-lo * inv), 0, qmax)
    v = torch.clamp(x * inv[:, None], -256.0, 256.0)
    q = torch.clamp(torch.round(v) + zp[:, None], 0, qmax)
    return ((q - zp[:, None]) * scale[:, None]).to(rows.dtype)


class ActivationFakeQuant(nn.Module):
    """Fake-quantizes a layer's input.

    modes: ``"observe"`` (PTQ calibration: pass through, feed the observer),
    ``"quantize"``. With ``learn_range`` (QAT, static), training-mode forwards
    update an exponential moving average of the batch min/max and recompute the
    scale / zero point; eval-mode forwards (and ``freeze()``) keep them fixed.
    ``rows``: ``"last_dim"`` (a Linear: each vector along the last dim is a row) or ``"im2col"`` (a Conv2d:
    its im2col rows, quantized inside ``im2col_conv_forward``; this module is then not a pre-hook) for
    dynamic activations.
    """

    def __init__(self, activations: str, bits: int, rows: str, learn_range: bool = False,
                 range_momentum: float = 0.01) -> None:
        super().__init__()
        self.activations = activations
        self.bits = bits
        self.rows = rows
        self.learn_range = learn_range
        self.range_momentum = range_momentum
        self.mode = "quantize"
        self.observer = None
        self.frozen = False
        self.register_buffer("scale", torch.ones((), dtype=_F32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("range_min", torch.zeros((), dtype=_F32))
        self.register_buffer("range_max", torch.zeros((), dtype=_F32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def set_range(self, lo: float, hi: float) -> None:
        scale, zp = affine_qparams(lo, hi, self.bits)
        self.range_min.fill_(lo)
        self.range_max.fill_(hi)
        self.scale.fill_(scale)
        self.zero_point.fill_(zp)
        self.initialized.fill_(True)

    def freeze(self) -> None:
        self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observer.update(x)
            return x
        if self.activations == "dynamic":
            if self.rows != "last_dim":
                raise RuntimeError("ActivationFakeQuant: a Conv2d's dynamic rows are its im2col rows; its "
                                   "input is quantized inside im2col_conv_forward, not by this module")
            rows = x.reshape(-1, x.shape[-1])
            if rows.numel() == 0:
                return x
            return x + (dynamic_fake_quantize_rows(rows, self.bits).reshape(x.shape) - x).detach()
        if self.learn_range and self.training and not self.frozen:
            self._update_range(x)
        if not bool(self.initialized):
            raise RuntimeError("ActivationFakeQuant: static activation range was never observed; run training "
                               "forwards (QAT) or pass calibration_batches first")
        qmax = 2 ** self.bits - 1
        zp = self.zero_point.to(_F32)
        lo = (0.0 - zp) * self.scale
        hi = (qmax - zp) * self.scale
        clipped = torch.maximum(torch.minimum(x, hi.to(x.dtype)), lo.to(x.dtype))
        fq = fake_quantize_affine(x.detach(), self.scale, self.zero_point, self.bits)
        return clipped + (fq - clipped).detach()

    @torch.no_grad()
    def _update_range(self, x: torch.Tensor) -> None:
        finite = x.detach()[torch.isfinite(x.detach())]
        if finite.numel() == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
        if bool(self.initialized):
            m = self.range_momentum
            lo = (1 - m) * float(self.range_min) + m * lo
            hi = (1 - m) * float(self.range_max) + m * hi
        self.set_range(lo, hi)

    def extra_repr(self) -> str:
        if self.activations == "dynamic":
            return f"uint{self.bits} dynamic per {'row' if self.rows == 'last_dim' else 'im2col row'}"
        return f"uint{self.bits} static scale={float(self.scale):.4g} zp={int(self.zero_point)}"


def im2col_conv_forward(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``conv._conv_forward`` of a Conv2d with dynamic activation fake quantization: its input as the int8 conv
    kernels quantize it, per im2col row (each output position's receptive field, its zero padding included;
    ``activation_fake_quant.bits`` wide), straight-through, then the float GEMM with ``weight`` (the layer's
    fake-quantized weight)."""
    cols, (ho, wo) = conv_im2col(conv, x)  # [N, K, L]
    n, k, _ = cols.shape
    rows = cols.transpose(1, 2).reshape(-1, k)
    if rows.numel():
        rows = rows + (dynamic_fake_quantize_rows(rows, conv.activation_fake_quant.bits) - rows).detach()
    groups, o = conv.groups, weight.shape[0]
    # [rows, groups, K/groups] x [groups, O/groups, K/groups] -> [rows, O]
    y = torch.einsum("rgk,gok->rgo", rows.reshape(rows.shape[0], groups, k // groups),
                     weight.reshape(groups, o // groups, k // groups)).reshape(rows.shape[0], o)
    if bias is not None:
        y = y + bias
    return y.reshape(n, ho, wo, o).permute(0, 3, 1, 2)


def quantize_input_hook(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: fake-quantize the first positional input."""
    return (module.activation_fake_quant(args[0]),) + tuple(args[1:])
