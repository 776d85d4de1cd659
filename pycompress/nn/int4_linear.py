"""Int4Linear: a Linear layer on the W4A8 kernel (4-bit weights in groups along K, int8 activations)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from pycompress import ops
from pycompress._native import activation_code, get_isa, num_threads
from pycompress.nn.checks import check_finite_bias, features_problems, file_tensor, gemm_config_problems, is_int, raise_problems
from pycompress.nn.int8_conv import build_lowered
from pycompress.nn.registry import (CompressedLayer, Format, QuantParams, half_on_cpu, register_format,
                                     register_layer)
from pycompress.ops.q4 import int4_linear_plan
from pycompress.ops.q8 import eager_rows, kernel_dtype
from pycompress.reference.q4 import (
    GROUP_SIZES,
    KBLOCK,
    W4_BITS,
    check_group_size,
    group_count,
    pack_int4_weights,
    quantize_weight_grouped,
    unpack_group_scales,
    unpack_int4_weights,
)
from pycompress.reference.q8 import MAX_K, PANEL, act_qmax, round_up

_F32 = torch.float32
_empty = torch.empty
_is_compiling = torch.compiler.is_compiling


def default_group_size(k: int) -> int | None:
    """The group a layer of K input features gets when none is asked for: the largest of GROUP_SIZES
    (128 first) dividing K, else one group per channel."""
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if k % g == 0), None)


@register_layer
class Int4Linear(CompressedLayer):
    """y = act(x @ W^T + b) with 2..4-bit symmetric weights, one float scale per output channel and group
    of ``group_size`` input features (None: per channel), stored two a byte, and unsigned 8-bit (or u7)
    activations quantized per row at run time or with a calibrated static scale / zero point. Each group's
    products are summed exactly in int32, the group scales applied in a float epilogue of fixed order
    (csrc/q4/q4_gemm.h; reference: ``pycompress.reference.q4``), so every ISA path gives the same bits.
    Half the weight bytes of Int8Linear: decode (one row at a time) is bound by them.

    Buffers: ``w4`` (uint8 kernel layout), ``g_scale``, ``corr``, ``bias``; all in ``state_dict``.
    """

    FLOAT_KIND = "Linear"
    ENTROPY_CODED = ("w4",)
    FUSES_ACTIVATION = True
    LOWERS_CONV = True
    SHARES_INPUT = True  # may join a SharedInputGroup (pycompress.nn.int8_linear)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "none",
                 act_scale: float | None = None, act_zero_point: int = 0, weight_bits: int = 4,
                 group_size: int | None = 128, name: str | None = None, act_bits: int = 8) -> None:
        super().__init__()
        label = f"Int4Linear({name or f'{in_features}->{out_features}'})"
        act_qmax(act_bits)  # refuses other widths
        if not 1 <= in_features <= MAX_K:
            raise ValueError(f"{label}: in_features={in_features} must be in [1, {MAX_K}]")
        if out_features < 1:
            raise ValueError(f"{label}: out_features={out_features} must be >= 1")
        if weight_bits not in W4_BITS:
            raise ValueError(f"{label}: weight_bits={weight_bits!r} must be one of {W4_BITS} (5-8 bits run on Int8Linear)")
        check_group_size(in_features, group_size, label)
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self._act_code = activation_code(activation)
        self.act_scale = act_scale
        self.act_zero_point = act_zero_point
        self.act_bits = act_bits
        self.weight_bits = weight_bits
        self.group_size = group_size
        self.groups = group_count(in_features, group_size)
        self.name = name
        kp, np_ = round_up(in_features, KBLOCK), round_up(out_features, PANEL)
        self.register_buffer("w4", torch.zeros(np_ * kp // 2, dtype=torch.uint8))
        self.register_buffer("g_scale", torch.zeros(np_ * self.groups, dtype=_F32))
        self.register_buffer("corr", torch.zeros(np_, dtype=_F32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=_F32) if bias else None)
        self._shared_input = None  # a SharedInputGroup (pycompress.convert)
        self._plan = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, weight_scale: torch.Tensor | None = None,
                    weight_bits: int = 4, group_size: int | None = 128, name: str | None = None,
                    **kwargs) -> "Int4Linear":
        """Quantize (max-abs scale per group, or ``weight_scale`` [out, groups] from pycompress.quantize /
        GPTQ) and pack a 2-D float weight."""
        label = f"Int4Linear.from_weight({name or 'Linear'})"
        weight = weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"{label}: weight must be 2-D, got {tuple(weight.shape)}")
        if not torch.isfinite(weight).all():
            raise ValueError(f"{label}: weight has NaN or Inf; cannot quantize")
        if bias is not None and not torch.isfinite(bias).all():
            raise ValueError(f"{label}: bias has NaN or Inf")
        out_features, in_features = weight.shape
        mod = cls(in_features, out_features, bias=bias is not None, weight_bits=weight_bits, group_size=group_size,
                  name=name, **kwargs)
        if weight_scale is not None:
            scale = torch.as_tensor(weight_scale, dtype=_F32).detach().cpu()
            if scale.numel() != out_features * mod.groups:
                raise ValueError(f"{label}: weight_scale has {scale.numel()} entries, expected {out_features} x "
                                 f"{mod.groups} groups")
            if not (torch.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError(f"{label}: weight_scale must be finite and > 0")
            weight_scale = scale.reshape(out_features, mod.groups)
        q, scale = quantize_weight_grouped(weight.cpu(), weight_bits, group_size, weight_scale)
        mod._set_weights(q, scale)
        if bias is not None:
            mod.bias.copy_(bias.detach().to(_F32))
        return mod

    @classmethod
    def from_float(cls, linear: nn.Module, **kwargs) -> "Int4Linear":
        return cls.from_weight(linear.weight, getattr(linear, "bias", None), **kwargs)

    def _set_weights(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        w4, g_scale, corr = pack_int4_weights(q, scale, self.group_size)
        self.w4.copy_(w4)
        self.g_scale.copy_(g_scale)
        self.corr.copy_(corr)

    # ---------------------------------------------------------------- the format (pycompress.nn.registry)

    @property
    def format_name(self) -> str:
        return "int4"

    def kernel_name(self) -> str:
        return f"W4A8 GEMM ({get_isa()})"

    def config(self) -> dict:
        return {"bias": self.bias is not None, "activation": self.activation, "name": self.name,
                "act_scale": self.act_scale, "act_zero_point": self.act_zero_point, "weight_bits": self.weight_bits,
                "act_bits": self.act_bits, "group_size": self.group_size, "in_features": self.in_features,
                "out_features": self.out_features}

    @classmethod
    def config_problems(cls, cfg: dict) -> list[str]:
        problems = gemm_config_problems(cfg, quantized=True)
        if cfg.get("weight_bits") not in W4_BITS or isinstance(cfg.get("weight_bits"), bool):
            problems.append(f"weight_bits {cfg.get('weight_bits')!r} must be one of {W4_BITS}")
        gs = cfg.get("group_size")
        if gs is not None and not (is_int(gs, KBLOCK, MAX_K) and gs % KBLOCK == 0):
            problems.append(f"group_size {gs!r} must be null or a multiple of {KBLOCK}")
        elif gs is not None and is_int(cfg.get("in_features"), 1, MAX_K) and cfg["in_features"] % gs:
            problems.append(f"group_size {gs} does not divide in_features {cfg['in_features']}")
        return problems

    @classmethod
    def from_config(cls, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str, where: str,
                    shape: tuple[int, int] | None = None) -> "Int4Linear":
        if shape is None:
            raise_problems(cls.config_problems(cfg) + features_problems(cfg), where)
            shape = (cfg["in_features"], cfg["out_features"])
        else:
            gs = cfg.get("group_size")
            if gs is not None and shape[0] % gs:
                raise_problems([f"group_size {gs} does not divide K={shape[0]}"], where)
        k, n = shape
        kp, np_ = round_up(k, KBLOCK), round_up(n, PANEL)
        file_tensor(tensors, prefix + "w4", torch.uint8, np_ * kp // 2, where)
        common = {key: cfg.get(key) for key in ("bias", "activation", "act_scale", "act_zero_point", "weight_bits",
                                                 "group_size", "name", "act_bits")}
        return cls(k, n, **common)

    def validate_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
        """The packed operands' invariants: weights in the symmetric range of their bits with zero padding,
        finite positive scales (0 on padding channels), and corr equal to its definition."""
        k, n, g = self.in_features, self.out_features, self.groups
        np_ = round_up(n, PANEL)
        w4 = file_tensor(tensors, prefix + "w4", torch.uint8, np_ * round_up(k, KBLOCK) // 2, where)
        g_scale = file_tensor(tensors, prefix + "g_scale", _F32, np_ * g, where)
        corr = file_tensor(tensors, prefix + "corr", _F32, np_, where)
        full = unpack_int4_weights(w4, np_, round_up(k, KBLOCK))
        qmax = 2 ** (self.weight_bits - 1) - 1
        if full.numel() and (full.min() < -qmax or full.max() > qmax):
            raise ValueError(f"load: {where}: packed weights leave the symmetric int{self.weight_bits} range "
                             f"[-{qmax}, {qmax}]")
        if full[n:].any() or full[:, k:].any():
            raise ValueError(f"load: {where}: packed weights have nonzero padding (corrupt or not from pycompress)")
        scales = unpack_group_scales(g_scale, np_, g)
        if not (torch.isfinite(scales[:n]).all() and (scales[:n] > 0).all()) or scales[n:].any():
            raise ValueError(f"load: {where}: g_scale must be finite and > 0 (0 on padding channels)")
        _, _, expected = pack_int4_weights(full[:n, :k].contiguous(), scales[:n], self.group_size)
        if not torch.equal(expected.view(torch.int32), corr.view(torch.int32)):
            raise ValueError(f"load: {where}: corr does not match the packed weights and scales (corrupt file)")
        check_finite_bias(tensors, prefix, where)

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [out, in], scale float32 [out, groups])."""
        q = unpack_int4_weights(self.w4, self.out_features, self.in_features)
        return q, unpack_group_scales(self.g_scale, self.out_features, self.groups)

    INTEGER_DERIVED = ("w4", "corr")

    def integer_weight(self) -> torch.Tensor:
        return unpack_int4_weights(self.w4, self.out_features, self.in_features)

    @classmethod
    def derive_from_integer_weight(cls, q: torch.Tensor, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str,
                                   where: str) -> dict[str, torch.Tensor]:
        """w4 and corr from q and the stored group scales (``g_scale``)."""
        n, k = q.shape
        group_size = cfg.get("group_size")
        try:
            check_group_size(k, group_size, f"load: {where}")
            groups = group_count(k, group_size)
            g_scale = file_tensor(tensors, prefix + "g_scale", _F32, round_up(n, PANEL) * groups, where)
            w4, _, corr = pack_int4_weights(q, unpack_group_scales(g_scale, n, groups), group_size)
        except ValueError as exc:
            raise ValueError(f"load: {where}: cannot rebuild the int4 weights: {exc}") from None
        return {"w4": w4, "corr": corr}

    def dequantized_weight(self) -> torch.Tensor:
        q, scale = self.quantized_weight()
        gk = self.in_features // self.groups
        return (q.to(_F32).view(self.out_features, self.groups, gk) * scale[:, :, None]).view(
            self.out_features, self.in_features)

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w4, self.g_scale, self.corr, self.bias) if t is not None)

    # ---------------------------------------------------------------- running

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (type(x) is torch.Tensor and x.dtype is _F32 and x.is_cpu and self._shared_input is None
                and not _is_compiling()):
            return self._eager(x)
        if half_on_cpu(x):
            return self.forward(x.float()).to(x.dtype)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self._label()}: input has shape {tuple(x.shape)}, "
                             f"expected (..., {self.in_features}) features")
        if not kernel_dtype(x):
            raise TypeError(f"{self._label()}: input dtype {x.dtype}, expected torch.float32 (on CUDA also "
                            "float16 or bfloat16)")
        if type(x) is torch.Tensor and x.is_cpu and not _is_compiling():
            return self._shared_input.output(self, x)
        return ops.int4_linear(x, self.w4, self.g_scale, self.corr, self.bias, self.out_features, self.groups,
                               self._act_code, self.act_scale, self.act_zero_point, self.act_bits)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        shape = x.shape
        if not shape or shape[-1] != k:
            raise ValueError(f"{self._label()}: input has shape {tuple(shape)}, expected (..., {k}) features")
        x2, m, ldx = eager_rows(x, k)
        n = self.out_features
        y = _empty(m, n, dtype=_F32)
        self._native_plan().run(x2.data_ptr(), m, ldx, y.data_ptr(), num_threads())
        return y if len(shape) == 2 else y.view(*shape[:-1], n)

    def _native_plan(self):
        """The native plan of the current buffers and activation settings, rebuilt (and the buffers checked
        again) when a buffer was replaced or its storage moved; the record holds the buffers it was built
        from, so their addresses cannot be reused while it lives."""
        b = self._buffers
        held = (b["w4"], b["g_scale"], b["corr"], b["bias"])
        key = tuple(0 if t is None else t.data_ptr() for t in held) + (
            self._act_code, self.act_scale, self.act_zero_point, self.act_bits)
        r = self._plan
        if r is not None and all(a is c for a, c in zip(r[0], held)) and r[1] == key:
            return r[2]
        plan = int4_linear_plan(self.in_features, self.out_features, self.groups, *held, self._act_code,
                                self.act_scale, self.act_zero_point, self.act_bits)
        self._plan = (held, key, plan)
        return plan

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_plan"] = None  # raw pointers: rebuilt on the next call
        return state

    def set_activation(self, activation: str) -> None:
        self._act_code = activation_code(activation)
        self.activation = activation

    def get_extra_state(self) -> dict:
        cfg = self.config()
        return {"format": "int4_linear/v1", **{k: cfg[k] for k in ("in_features", "out_features", "activation",
                                                                    "act_scale", "act_zero_point", "weight_bits",
                                                                    "act_bits", "group_size")}}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        for key in ("format", "in_features", "out_features", "group_size"):
            if state.get(key) != mine[key]:
                raise ValueError(f"{self._label()}: state_dict has {key}={state.get(key)!r}, "
                                 f"this module expects {mine[key]!r}")
        self.set_activation(state["activation"])
        self.act_scale = state["act_scale"]
        self.act_zero_point = state["act_zero_point"]
        self.weight_bits = state["weight_bits"]
        self.act_bits = state["act_bits"]

    def _label(self) -> str:
        return f"Int4Linear({self.name})" if self.name else f"Int4Linear({self.in_features}->{self.out_features})"

    # SharedInputGroup members (pycompress.nn.int8_linear) answer these two.
    def _operands(self) -> tuple:
        b = self._buffers
        return b["w4"], b["g_scale"], b["corr"], b["bias"], self._act_code, self.out_features, self.groups

    def _stamp(self) -> tuple:
        b = self._buffers
        return tuple((id(t), None if t is None else t._version) for t in (b["w4"], b["g_scale"], b["corr"], b["bias"])) + (
            self._act_code, self.act_scale, self.act_zero_point, self.act_bits)

    def extra_repr(self) -> str:
        acts = "dynamic per-row" if self.act_scale is None else f"static scale={self.act_scale:.4g} zp={self.act_zero_point}"
        act = "" if self.activation == "none" else f", activation={self.activation}"
        group = "per-channel" if self.group_size is None else f"group {self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=int{self.weight_bits} {group}, activations=uint{self.act_bits} {acts}{act}, "
                f"bytes={self.packed_bytes()}"
                + ("" if self._shared_input is None else f", input shared with {self._shared_input.size - 1} other(s)"))


def _build_int4(layer: nn.Module, name: str | None, quant: QuantParams) -> CompressedLayer:
    k = layer.weight[0].numel()
    # pycompress.quantize's scales where it quantized to 2-4 bits (its groups, GPTQ's scales); else max-abs
    # 4-bit scales in the default groups.
    calibrated = quant.weight_bits in W4_BITS and quant.weight_scale is not None
    bits = quant.weight_bits if quant.weight_bits in W4_BITS else 4
    group_size = quant.group_size if calibrated else default_group_size(k)
    scale = quant.weight_scale if calibrated else None
    kwargs = {"weight_bits": bits, "group_size": group_size, "act_bits": quant.act_bits, "name": name}
    if quant.act_scale is not None:
        kwargs.update(act_scale=quant.act_scale, act_zero_point=quant.act_zero_point)
    return build_lowered(layer, name, lambda w, b: Int4Linear.from_weight(w, b, weight_scale=scale, **kwargs))


register_format(Format("int4", True, _build_int4, "Int4Linear: 2-4-bit weights in groups along K, two a byte, "
                                                  "int8 activations (W4A8)"))
