"""Int8Linear: a Linear layer on the int8 GEMM kernel."""

from __future__ import annotations

import threading
import weakref
from types import SimpleNamespace

import torch
from torch import nn

from pycompress import _C, ops
from pycompress._native import activation_code, get_isa, num_threads
from pycompress.nn.checks import (
    check_finite_bias,
    check_packed_size,
    check_scales,
    features_problems,
    gemm_config_problems,
    raise_problems,
)
from pycompress.nn.registry import CompressedLayer, half_on_cpu, register_layer
from pycompress.ops.q8 import eager_rows, kernel_dtype, int8_linear_plan
from pycompress.ops.shared_input import int8_linear_shared_input_cpu
from pycompress.reference.q8 import (
    KGROUP,
    act_qmax,
    MAX_K,
    PANEL,
    pack_int8_weights,
    quantize_weight_per_channel,
    round_up,
    unpack_int8_weights,
)


# Bound once: the eager forward runs these on every call.
_F32 = torch.float32
_empty = torch.empty
_is_compiling = torch.compiler.is_compiling


def quantize_with_scale(weight: torch.Tensor, weight_scale, bits: int, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale) of a 2-D float weight with a calibrated per-channel ``weight_scale`` (from
    ``pycompress.quantize``) instead of the max-abs one: what both int8 formats store."""
    scale = torch.as_tensor(weight_scale, dtype=torch.float32).detach().cpu().reshape(-1)
    if scale.numel() != weight.shape[0]:
        raise ValueError(f"{label}: weight_scale has {scale.numel()} entries, weight has {weight.shape[0]} output channels")
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"{label}: weight_scale must be finite and > 0")
    qmax = 2 ** (bits - 1) - 1
    q = torch.clamp(torch.round(weight.detach().float().cpu() / scale[:, None]), -qmax, qmax).to(torch.int8)
    return q, scale


@register_layer
class Int8Linear(CompressedLayer):
    """y = act(x @ W^T + b) with int8 weights (symmetric, per output channel) and
    unsigned activations quantized per row at run time (``act_scale=None``) or with a
    calibrated static scale / zero point: 8 bits, or 7 (``act_bits=7``, the u7 format:
    exact on AVX2's vpmaddubsw, ~1.3-1.8x the u8 speed there; csrc/q8/q8_gemm.h).

    Buffers: ``w_packed`` (kernel layout, see csrc/q8/q8_gemm.h), ``col_sum``,
    ``w_scale``, ``bias``; all in ``state_dict``.
    """

    FLOAT_KIND = "Linear"
    ENTROPY_CODED = ("w_packed",)
    FUSES_ACTIVATION = True
    SHARES_INPUT = True  # may join a SharedInputGroup (as Int4Linear may)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "none",
        act_scale: float | None = None,
        act_zero_point: int = 0,
        weight_bits: int = 8,
        name: str | None = None,
        act_bits: int = 8,
    ) -> None:
        super().__init__()
        act_qmax(act_bits)  # refuses other widths
        if not 1 <= in_features <= MAX_K:
            raise ValueError(f"Int8Linear: in_features={in_features} must be in [1, {MAX_K}] "
                             "(larger K can overflow the int32 accumulator)")
        if out_features < 1:
            raise ValueError(f"Int8Linear: out_features={out_features} must be >= 1")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self._act_code = activation_code(activation)
        self.act_scale = act_scale
        self.act_zero_point = act_zero_point
        self.act_bits = act_bits
        self.weight_bits = weight_bits
        self.name = name
        kp, np_ = round_up(in_features, KGROUP), round_up(out_features, PANEL)
        self.register_buffer("w_packed", torch.zeros(np_ * kp, dtype=torch.int8))
        self.register_buffer("col_sum", torch.zeros(np_, dtype=torch.int32))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self._shared_input: SharedInputGroup | None = None  # set by SharedInputGroup (pycompress.convert)
        self._plan = None  # (operands, key, native plan) of the eager path; see _native_plan

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        activation: str = "none",
        act_scale: float | None = None,
        act_zero_point: int = 0,
        weight_bits: int = 8,
        name: str | None = None,
        act_bits: int = 8,
    ) -> "Int8Linear":
        """Quantize and pack an ``nn.Linear`` (or anything with a 2-D ``weight`` and optional ``bias``)."""
        weight = linear.weight.detach()
        label = name or type(linear).__name__
        if weight.dim() != 2:
            raise ValueError(f"Int8Linear.from_float({label}): weight must be 2-D, got {tuple(weight.shape)}")
        if not torch.isfinite(weight).all():
            raise ValueError(f"Int8Linear.from_float({label}): weight has NaN or Inf; cannot quantize")
        b = getattr(linear, "bias", None)
        if b is not None and not torch.isfinite(b).all():
            raise ValueError(f"Int8Linear.from_float({label}): bias has NaN or Inf")
        out_features, in_features = weight.shape
        mod = cls(in_features, out_features, bias=b is not None, activation=activation, act_scale=act_scale,
                  act_zero_point=act_zero_point, weight_bits=weight_bits, name=name, act_bits=act_bits)
        q, scale = quantize_weight_per_channel(weight.cpu(), bits=weight_bits)
        packed, col_sum = pack_int8_weights(q)
        mod.w_packed.copy_(packed)
        mod.col_sum.copy_(col_sum)
        mod.w_scale.copy_(scale)
        if b is not None:
            mod.bias.copy_(b.detach().to(torch.float32))
        return mod

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, weight_scale: torch.Tensor | None = None,
                    name: str | None = None, **kwargs) -> "Int8Linear":
        """Int8Linear for a 2-D float weight; ``weight_scale`` [out] uses a calibrated per-channel scale
        (from ``pycompress.quantize``) instead of the max-abs one ``from_float`` computes."""
        gemm = cls.from_float(SimpleNamespace(weight=weight, bias=bias), name=name, **kwargs)
        if weight_scale is None:
            return gemm
        q, scale = quantize_with_scale(weight, weight_scale, gemm.weight_bits, name or "Int8Linear")
        packed, col_sum = pack_int8_weights(q)
        gemm.w_packed.copy_(packed)
        gemm.col_sum.copy_(col_sum)
        gemm.w_scale.copy_(scale)
        return gemm

    # ---------------------------------------------------------------- the format (pycompress.nn.registry)

    @property
    def format_name(self) -> str:
        return "int8-dynamic" if self.act_scale is None else "int8-static"

    def kernel_name(self) -> str:
        return f"q8 GEMM ({get_isa()})"

    def config(self) -> dict:
        return {"bias": self.bias is not None, "activation": self.activation, "name": self.name,
                "act_scale": self.act_scale, "act_zero_point": self.act_zero_point, "weight_bits": self.weight_bits,
                "act_bits": self.act_bits, "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def config_problems(cls, cfg: dict) -> list[str]:
        return gemm_config_problems(cfg, quantized=True)

    @classmethod
    def from_config(cls, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str, where: str,
                    shape: tuple[int, int] | None = None) -> "Int8Linear":
        if shape is None:
            raise_problems(cls.config_problems(cfg) + features_problems(cfg), where)
            shape = (cfg["in_features"], cfg["out_features"])
        check_packed_size(*shape, tensors.get(prefix + "w_packed"), where)
        common = {k: cfg.get(k) for k in ("bias", "activation", "act_scale", "act_zero_point", "weight_bits", "name")}
        return cls(*shape, **common, act_bits=cfg.get("act_bits", 8))  # files before u7 hold no act_bits

    def validate_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
        """The packed operands' invariants; the kernel reads them without further checks."""
        k, n = self.in_features, self.out_features
        kp, np_ = round_up(k, KGROUP), round_up(n, PANEL)
        packed, col_sum = tensors[prefix + "w_packed"], tensors[prefix + "col_sum"]
        qmax = 2 ** (self.weight_bits - 1) - 1
        full = packed.view(np_ // PANEL, kp // KGROUP, PANEL, KGROUP).permute(0, 2, 1, 3).reshape(np_, kp)
        if full.numel() and (full.min() < -qmax or full.max() > qmax):
            raise ValueError(f"load: {where}: packed weights leave the symmetric int{self.weight_bits} range "
                             f"[-{qmax}, {qmax}]")
        if full[n:].any() or full[:, k:].any():
            raise ValueError(f"load: {where}: packed weights have nonzero padding (corrupt or not from pycompress)")
        if not torch.equal(full.sum(dim=1, dtype=torch.int32), col_sum):
            raise ValueError(f"load: {where}: col_sum does not match the packed weights (corrupt file)")
        check_scales(tensors[prefix + "w_scale"], where)
        check_finite_bias(tensors, prefix, where)

    def dequantized_weight(self) -> torch.Tensor:
        return self.integer_weight().to(torch.float32) * self.w_scale[:, None]

    INTEGER_DERIVED = ("w_packed", "col_sum")

    def integer_weight(self) -> torch.Tensor:
        return unpack_int8_weights(self.w_packed, self.out_features, self.in_features)

    @classmethod
    def derive_from_integer_weight(cls, q: torch.Tensor, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str,
                                   where: str) -> dict[str, torch.Tensor]:
        packed, col_sum = pack_int8_weights(q)
        return {"w_packed": packed, "col_sum": col_sum}

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
        if type(x) is torch.Tensor and x.is_cpu and not torch.compiler.is_compiling():
            # Eager CPU in a shared-input group: its output may already be computed.
            return self._shared_input.output(self, x)
        return ops.int8_linear(x, self.w_packed, self.col_sum, self.w_scale, self.bias,
                               self._act_code, self.act_scale, self.act_zero_point, self.act_bits)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        # Eager CPU call: the native plan of this layer's operands, without the dispatcher
        # round trip and without re-checking the weights on every call (each check costs
        # ~0.1 us of Python; bench/README.md: per-call overhead). Same kernel as the op.
        k = self.in_features
        shape = x.shape
        if not shape or shape[-1] != k:
            raise ValueError(f"{self._label()}: input has shape {tuple(shape)}, expected (..., {k}) features")
        x2, m, ldx = eager_rows(x, k)
        plan = self._native_plan()
        n = self.out_features
        y = _empty(m, n, dtype=_F32)
        plan.run(x2.data_ptr(), m, ldx, y.data_ptr(), num_threads())
        return y if len(shape) == 2 else y.view(*shape[:-1], n)

    def _native_plan(self):
        """The native plan for the current buffers and activation settings; rebuilt (and the
        buffers checked again) when a buffer was replaced or its storage moved. The record holds
        the buffers it was built from, so their addresses cannot be reused while it lives."""
        b = self._buffers
        w, c, s, bias = b["w_packed"], b["col_sum"], b["w_scale"], b["bias"]
        r = self._plan
        if r is not None:
            held = r[0]
            if (held[0] is w and held[1] is c and held[2] is s and held[3] is bias and r[1] == (
                    w.data_ptr(), c.data_ptr(), s.data_ptr(), 0 if bias is None else bias.data_ptr(),
                    self._act_code, self.act_scale, self.act_zero_point, self.act_bits)):
                return r[2]
        key = (w.data_ptr(), c.data_ptr(), s.data_ptr(), 0 if bias is None else bias.data_ptr(),
               self._act_code, self.act_scale, self.act_zero_point, self.act_bits)
        plan = int8_linear_plan(self.in_features, self.out_features, w, c, s, bias, self._act_code, self.act_scale,
                                self.act_zero_point, self.act_bits)
        self._plan = ((w, c, s, bias), key, plan)
        return plan

    def __getstate__(self) -> dict:
        # The native plan holds raw pointers: never copied or pickled, rebuilt on the next call.
        state = dict(super().__getstate__())
        state["_plan"] = None
        return state

    def set_activation(self, activation: str) -> None:
        """Sets the activation the kernel applies in its epilogue ("none", "relu", "gelu")."""
        self._act_code = activation_code(activation)
        self.activation = activation

    def get_extra_state(self) -> dict:
        # The packed buffers alone do not pin down K (it is padded to a multiple
        # of 4): the configuration travels with the state_dict and is checked on load.
        cfg = self.config()
        return {"format": "int8_linear/v1", **{k: cfg[k] for k in ("in_features", "out_features", "activation",
                                                                    "act_scale", "act_zero_point", "weight_bits",
                                                                    "act_bits")}}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        for key in ("format", "in_features", "out_features"):
            if state.get(key) != mine[key]:
                raise ValueError(f"{self._label()}: state_dict has {key}={state.get(key)!r}, "
                                 f"this module expects {mine[key]!r}")
        self.activation = state["activation"]
        self._act_code = activation_code(self.activation)
        self.act_scale = state["act_scale"]
        self.act_zero_point = state["act_zero_point"]
        self.weight_bits = state["weight_bits"]
        self.act_bits = state.get("act_bits", 8)  # state_dicts before u7 hold none

    def _label(self) -> str:
        return f"Int8Linear({self.name})" if self.name else f"Int8Linear({self.in_features}->{self.out_features})"

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_packed, self.col_sum, self.w_scale, self.bias)
                   if t is not None)

    def _operands(self) -> tuple:
        b = self._buffers
        return b["w_packed"], b["col_sum"], b["w_scale"], b["bias"], self._act_code

    def _stamp(self) -> tuple:
        # Identity and version of every operand: any change to the layer after a shared call
        # computed its output makes that output stale.
        b = self._buffers
        w, c, s, bias = b["w_packed"], b["col_sum"], b["w_scale"], b["bias"]
        return (id(w), w._version, id(c), c._version, id(s), s._version, id(bias),
                0 if bias is None else bias._version, self._act_code, self.act_scale, self.act_zero_point,
                self.act_bits)

    def extra_repr(self) -> str:
        acts = "dynamic per-row" if self.act_scale is None else f"static scale={self.act_scale:.4g} zp={self.act_zero_point}"
        act = "" if self.activation == "none" else f", activation={self.activation}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=int{self.weight_bits} per-channel, activations=uint{self.act_bits} {acts}{act}, "
                f"bytes={self.packed_bytes()}"
                + ("" if self._shared_input is None else f", input shared with {self._shared_input.size - 1} other(s)"))


class SharedInputGroup:
    """Int8Linear layers that read the same input tensor, e.g. a transformer's query, key and
    value projections. The first member called with ``x`` computes every member's output in one
    kernel call (x quantized once, all tiles in one parallel pass; bench/README.md); each other
    member then takes its output instead of recomputing it, provided it is called with that very
    tensor, unmodified (same ``_version``), on the same thread, and its own weights, activation and
    activation parameters did not change since. In every other case a member computes alone, so a
    result never depends on the grouping: it is bit-identical to the member's own kernel call.

    Inference tensors (made under ``torch.inference_mode``) have no version counter, so an in-place
    change of x between two member calls could not be seen: for them the outputs are shared only
    when ``adjacent=True``, which says the members are always called back to back on the same
    tensor with nothing in between (convert sets it for parent modules whose forward it knows,
    ``pycompress.convert.SHARED_INPUT_PARENTS``); otherwise each member computes alone.

    Eager CPU calls only; traced / compiled / exported calls take each member's own op. Outputs
    waiting for their member are held per thread until taken or replaced by the next shared call.
    """

    @staticmethod
    def can_join(layer: nn.Module) -> bool:
        """Whether ``layer`` can be a member: a dense layer on the int8-activation GEMM (Int8Linear,
        Int4Linear: class attribute SHARES_INPUT) not in a group yet."""
        return getattr(type(layer), "SHARES_INPUT", False) and layer._shared_input is None

    @staticmethod
    def compatible(members: list[Int8Linear]) -> bool:
        """Whether the members quantize one input alike (same K, activation scale and zero point)."""
        first = members[0]
        return all(m.in_features == first.in_features and m.act_scale == first.act_scale
                   and m.act_zero_point == first.act_zero_point and m.act_bits == first.act_bits for m in members)

    def __init__(self, members: list[Int8Linear], adjacent: bool = False) -> None:
        if len(members) < 2:
            raise ValueError("SharedInputGroup: needs at least two Int8Linear layers")
        for m in members:
            if not getattr(type(m), "SHARES_INPUT", False):
                raise TypeError(f"SharedInputGroup: {type(m).__name__} is not an Int8Linear / Int4Linear")
            if m._shared_input is not None:
                raise ValueError(f"SharedInputGroup: {m._label()} already shares its input with another group")
        k = members[0].in_features
        for m in members[1:]:
            if m.in_features != k:
                raise ValueError(f"SharedInputGroup: {m._label()} has {m.in_features} input features, "
                                 f"{members[0]._label()} has {k}")
        self.members = list(members)
        self.adjacent = adjacent
        self._local = threading.local()
        self._tuner = _C.ThreadTuner()  # learns the thread count of the group's small calls
        for m in self.members:
            m._shared_input = self

    @property
    def size(self) -> int:
        return len(self.members)

    def dissolve(self) -> None:
        """Every member computes alone again."""
        for m in self.members:
            m._shared_input = None
        self._local = threading.local()

    def output(self, member: Int8Linear, x: torch.Tensor) -> torch.Tensor:
        version = None if x.is_inference() else x._version
        if version is None and not self.adjacent:
            return member._eager(x)
        local = self._local
        pending = getattr(local, "pending", None)
        if pending is not None and pending[0]() is x and pending[1] == version:
            waiting = pending[2].pop(id(member), None)
            if waiting is not None and waiting[1] == member._stamp():
                return waiting[0]
        first = self.members[0]
        scale, zero_point, bits = first.act_scale, first.act_zero_point, first.act_bits
        for m in self.members:
            if m.act_scale != scale or m.act_zero_point != zero_point or m.act_bits != bits:
                local.pending = None  # members no longer quantize x alike: each computes alone
                return member._eager(x)
        ys = int8_linear_shared_input_cpu(x, [m._operands() for m in self.members], scale, zero_point, self._tuner,
                                          bits)
        mine = None
        waiting = {}
        for m, y in zip(self.members, ys):
            if m is member:
                mine = y
            else:
                waiting[id(m)] = (y, m._stamp())
        local.pending = (weakref.ref(x), version, waiting)
        return mine

    def __getstate__(self) -> dict:
        # Pending outputs, the thread-local store and the learned thread count are not state.
        return {"members": self.members, "adjacent": self.adjacent}

    def __setstate__(self, state: dict) -> None:
        self.members = state["members"]
        self.adjacent = state["adjacent"]
        self._local = threading.local()
        self._tuner = _C.ThreadTuner()

