"""The format registry: the one place that says which compressed layers and formats exist.

Two tables, filled by the module files of ``pycompress.nn`` when they are imported:

- ``LAYER_TYPES``: class name -> a ``CompressedLayer`` subclass (``@register_layer``). The name is what a
  saved file's manifest calls the layer; ``pycompress.load`` asks this table, never a list of its own.
- ``FORMATS``: conversion format name -> ``Format`` (``register_format``): how a float ``nn.Linear`` /
  ``nn.Conv2d`` plus its prune / quant state becomes a compressed layer. ``pycompress.convert`` offers
  exactly these (and ``"float"``, which keeps the layer).

A ``CompressedLayer`` answers everything convert, verify, summary, save / load and the size reports ask
of a format (see the class). Code outside ``pycompress.nn`` asks the layer, never its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

# ------------------------------------------------------------------------------------------------ tables

LAYER_TYPES: dict[str, type["CompressedLayer"]] = {}
FORMATS: dict[str, "Format"] = {}


@dataclass(frozen=True)
class QuantParams:
    """What ``pycompress.quantize`` decided for a layer (the defaults: dynamic activations, max-abs
    per-channel weight scales)."""

    weight_bits: int = 8
    weight_scale: torch.Tensor | None = None  # [out_channels] (or [out, groups]) calibrated scale, or None: max-abs
    group_size: int | None = None  # the weight groups along K of a 2-4-bit quantization (None: per channel)
    act_scale: float | None = None  # static activations when set
    act_zero_point: int = 0
    act_bits: int = 8  # 8 (u8) or 7 (u7: the int8 formats' AVX2 fast path; sparse-int8 runs u8 only)


@dataclass(frozen=True)
class Format:
    """A conversion format. ``build(layer, name, quant)`` turns a float32 ``nn.Linear`` / ``nn.Conv2d`` (its
    pruning mask applied to ``layer.weight``) into the compressed layer; ``int8_numbers``: it quantizes
    (its error budget follows its weight bits) rather than only reordering float32 sums."""

    name: str
    int8_numbers: bool
    build: Callable[[nn.Module, str | None, QuantParams], "CompressedLayer"]
    description: str = ""


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS or fmt.name == "float":
        raise ValueError(f"register_format: format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def register_layer(cls: type["CompressedLayer"]) -> type["CompressedLayer"]:
    """Class decorator: ``cls`` can be found by its name in a saved file."""
    if LAYER_TYPES.get(cls.__name__, cls) is not cls:
        raise ValueError(f"register_layer: another class is registered as {cls.__name__}")
    LAYER_TYPES[cls.__name__] = cls
    return cls


# ------------------------------------------------------------------------------------------------ layers

# Buffer dtypes plain pickle cannot carry (torch 2.13) -> the signed dtype of the same width they travel as.
_PICKLED_AS = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


_HALF = (torch.float16, torch.bfloat16)


def half_on_cpu(x: torch.Tensor) -> bool:
    """A float16 / bfloat16 input on the CPU (a half-precision model, bfloat16 autocast): each layer's forward then
    runs its float32 kernels on the exact float32 widening and rounds its output once to the input's dtype, what
    the CUDA kernels do inside (checked after each forward's float32 fast path, so that path pays nothing)."""
    return x.dtype in _HALF and x.device.type == "cpu"


class CompressedLayer(nn.Module):
    """The contract of a compressed layer (every class in ``LAYER_TYPES``).

    Class attributes: ``FLOAT_KIND`` ("Linear" or "Conv2d": the float layer it replaces),
    ``ENTROPY_CODED`` (buffers ``save(..., entropy_coding=True)`` may Huffman-code: integer weights and
    index arrays), ``FUSES_ACTIVATION`` (its kernel can apply a following ReLU / GELU in its epilogue).

    Methods a format implements: ``format_name``, ``weight_bits``, ``kernel_name()``, ``config()`` and
    ``from_config(cfg, tensors, prefix, where)``, ``validate_tensors(tensors, prefix, where)``,
    ``packed_bytes()``, ``pruned_bytes()``, ``matches_float(layer)``; a fusing format also
    ``set_activation(kind)``. ``activation`` is the activation its kernel applies ("none" by default);
    ``act_bits`` the width of its quantized activations (8 by default; the verify budget follows it).
    """

    FLOAT_KIND: ClassVar[str] = "Linear"
    ENTROPY_CODED: ClassVar[tuple[str, ...]] = ()
    FUSES_ACTIVATION: ClassVar[bool] = False
    LOWERS_CONV: ClassVar[bool] = False  # a GEMM module Im2colConv2d may run a conv on
    activation: str = "none"
    act_bits: int = 8
    float_dtype: torch.dtype = torch.float32  # the dtype the model was last cast to (_apply); weight.dtype

    @property
    def format_name(self) -> str:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        """The format fixes its buffers' dtypes (float32 scales, biases and sparse values, integer weights), so a
        cast of the whole model (``model.half()``, ``model.to(torch.bfloat16)``) moves them to the new device
        and leaves their dtype: the kernels keep their contract and the layer keeps computing the same bits.
        The cast is recognised by what ``fn`` does to float32 and float64 probes, and recorded as the dtype
        ``weight`` reports (``float_dtype``): model code that casts its inputs to a layer's ``weight.dtype`` (a
        Hugging Face ViT's patch embedding) then hands the rest of the cast model what it expects."""
        probe = fn(torch.zeros((), dtype=torch.float32))
        if isinstance(probe, torch.Tensor) and probe.dtype != torch.float32:
            self.float_dtype = probe.dtype
            device = probe.device
            return super()._apply(lambda t: t.to(device), recurse)
        wide = fn(torch.zeros((), dtype=torch.float64))
        if isinstance(wide, torch.Tensor) and wide.dtype == torch.float32:  # .float(), .to(torch.float32)
            self.float_dtype = torch.float32
        return super()._apply(fn, recurse)

    def fuses_activation(self) -> bool:
        return self.FUSES_ACTIVATION

    def kernel_name(self) -> str:
        return type(self).__name__

    def config(self) -> dict:
        """The JSON constructor config a saved file stores for this layer."""
        raise NotImplementedError

    @classmethod
    def config_problems(cls, cfg: dict) -> list[str]:
        """What is wrong with the fields of ``cfg`` other than its shape (empty when nothing)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str, where: str,
                    shape: tuple[int, int] | None = None) -> "CompressedLayer":
        """An empty layer for a manifest entry, after checking every field of ``cfg`` and sizing it from the
        file's own ``tensors`` (``prefix`` + buffer name), never from the manifest alone. Raises ValueError
        naming ``where``. ``shape``: (K, N) of a GEMM module inside a lowered conv, whose ``config_problems``
        the conv has checked."""
        raise NotImplementedError

    def validate_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
        """Every invariant the kernels rely on, checked on the file's tensors before they are loaded."""
        raise NotImplementedError

    def entropy_coded_keys(self) -> list[str]:
        """state_dict keys (relative to this layer) that entropy coding may store Huffman-coded."""
        return [b for b in self.ENTROPY_CODED if self._buffers.get(b) is not None]

    # Buffers that are a function of the layer's integer weight matrix alone (with its other stored buffers):
    # ``save(..., entropy_coding=True)`` may store the matrix as zero runs and nonzeros instead
    # (pycompress.entropy.ZeroRunCoded) and ``load`` rebuilds them with ``derive_from_integer_weight``.
    INTEGER_DERIVED: ClassVar[tuple[str, ...]] = ()

    def integer_weight_modules(self) -> list[tuple[str, "CompressedLayer"]]:
        """(state_dict prefix relative to this layer, module) of each module inside it with
        ``INTEGER_DERIVED`` buffers: this layer itself by default, its GEMM for a lowered conv."""
        return [("", self)] if self.INTEGER_DERIVED else []

    def integer_weight(self) -> torch.Tensor:
        """The integer weights, int8 [out_features, in_features], pruned ones 0 (``INTEGER_DERIVED``)."""
        raise NotImplementedError

    @classmethod
    def derive_from_integer_weight(cls, q: torch.Tensor, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str,
                                   where: str) -> dict[str, torch.Tensor]:
        """The ``INTEGER_DERIVED`` buffers (by name) of a layer of config ``cfg`` whose integer weights are
        ``q``, packed as building the layer packs them; ``tensors`` (``prefix`` + name) holds its other
        stored buffers. Raises ValueError naming ``where`` when they cannot be built."""
        raise NotImplementedError

    def packed_bytes(self) -> int:
        raise NotImplementedError

    def pruned_bytes(self) -> int | None:
        """Deep Compression's "pruned" stage: bytes of the stored weights at 4 bytes each plus the index
        arrays and bias; None when the format stores every weight (pruning alone saves nothing)."""
        return None

    # ---------------------------------------------------------------- what model code reads from a layer

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer computes with (for a Linear [out, in]), built from the packed buffers."""
        raise NotImplementedError

    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @property
    def weight(self) -> "FloatWeight":
        """What model code reads from the float layer's ``weight`` (dtype, device, shape); its value on demand."""
        return FloatWeight(self)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight" and isinstance(value, torch.Tensor):
            # Hugging Face's tie_weights() assigns the embedding's Parameter to lm_head.weight: nn.Module's
            # answer was a bare KeyError ("attribute 'weight' already exists").
            raise AttributeError(
                f"{type(self).__name__} ({self.format_name}, {tuple(self.weight_shape())}): its weight is computed "
                f"from the packed {self.format_name} buffers and cannot be assigned a tensor; tie or assign "
                "weights in the float model, before pc.convert")
        super().__setattr__(name, value)

    def matches_float(self, layer: nn.Module) -> bool:
        """Whether ``layer`` (a float layer of a model skeleton) has this layer's shape."""
        return (layer.in_features, layer.out_features) == (self.in_features, self.out_features)

    # ---------------------------------------------------------------- pickle and copy.deepcopy

    def __getstate__(self) -> dict:
        """Buffers of a dtype plain ``pickle`` cannot carry in torch 2.13 (uint16 / uint32 / uint64: the
        unpickled UntypedStorage has no dtype) travel as a view of the signed type of their width, and
        ``__setstate__`` views them back: the same bytes, the same dtype, for pickle and copy.deepcopy alike."""
        state = dict(super().__getstate__())
        buffers = state.get("_buffers", {})
        dtypes = {name: b.dtype for name, b in buffers.items() if b is not None and b.dtype in _PICKLED_AS}
        if dtypes:
            state["_buffers"] = {name: b.view(_PICKLED_AS[dtypes[name]]) if name in dtypes else b
                                 for name, b in buffers.items()}
            state["_pickled_dtypes"] = dtypes
        return state

    def __setstate__(self, state: dict) -> None:
        dtypes = state.pop("_pickled_dtypes", {})
        super().__setstate__(state)
        for name, dtype in dtypes.items():
            self._buffers[name] = self._buffers[name].view(dtype)


class FloatWeight:
    """A compressed layer's ``weight``: the dtype, device and shape of the float weight it replaced, so model
    code that reads them (a Hugging Face ViT casts its pixels to ``projection.weight.dtype``) keeps working.
    The float value is computed from the packed buffers when asked for (``dequantize()``, or passing this to
    any torch function), never kept resident beside them."""

    __slots__ = ("_layer",)
    requires_grad = False
    is_sparse = False

    def __init__(self, layer: CompressedLayer) -> None:
        self._layer = layer

    @property
    def dtype(self) -> torch.dtype:
        """float32, or what a cast of the model made it (``model.half()``...: the layer's ``float_dtype``)."""
        return self._layer.float_dtype

    @property
    def device(self) -> torch.device:
        return next(self._layer.buffers()).device

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._layer.weight_shape())

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def dequantize(self) -> torch.Tensor:
        return self._layer.dequantized_weight().to(self.dtype)

    def __getattr__(self, name: str):
        # Any other tensor attribute or method (.T, .float(), .to(), .numpy()...): the float value's.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dequantize(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def value(a):
            return a.dequantize() if isinstance(a, FloatWeight) else a
        return func(*map(value, args), **{k: value(v) for k, v in (kwargs or {}).items()})

    def __repr__(self) -> str:
        return f"FloatWeight(shape={tuple(self.shape)}, dtype={self.dtype}, of {type(self._layer).__name__})"


# ------------------------------------------------------------------------------------------------ inspection


def float_kind(module: nn.Module) -> str | None:
    """"Linear" / "Conv2d" for a float layer convert can replace (a parametrized one included), else None."""
    t = parametrize.type_before_parametrizations(module)
    if issubclass(t, nn.Linear):
        return "Linear"
    if issubclass(t, nn.Conv2d):
        return "Conv2d"
    return None


def _is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and its kin): y = x @ W + b with W [in, out], a Linear with its weight
    transposed. Recognised by its class name and shape, so transformers need not be imported."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(module, "nf", None) == w.shape[1])


def linearize_transposed(model: nn.Module) -> list[str]:
    """Replaces every transformers ``Conv1D`` in ``model`` with an ``nn.Linear`` whose weight is the transposed
    *view* of the same storage (no copy; the same bias Parameter), so prune / quantize / convert / load treat
    it as any Linear. ``F.linear`` of that view is ``addmm(b, x, W)``, the Conv1D's own call: the float model
    computes the same values. Returns the replaced modules' names. The state_dict keys stay; the weight's
    shape becomes [out, in], as for a Linear."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or not _is_transposed_linear(module):
            continue
        weight = module.weight
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device="meta",
                           dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.detach().t(), requires_grad=weight.requires_grad)
        if module.bias is not None:
            linear.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        for alias in [n for n, m in parent.named_children() if m is module]:
            setattr(parent, alias, linear)
        replaced.append(name)
    return replaced


def is_compressed(module: nn.Module) -> bool:
    return isinstance(module, CompressedLayer)


def compressed_layers(model: nn.Module) -> list[tuple[str, CompressedLayer]]:
    """(qualified name, layer) of every compressed layer, outermost only (a conv's inner GEMM is part of
    its conv); a shared layer once per name."""
    out, inside = [], set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, CompressedLayer) and id(module) not in inside:
            out.append((name, module))
            inside.update(id(m) for m in module.modules() if m is not module)
    return out


def module_bytes(module: nn.Module, skip: tuple[type, ...] = ()) -> int:
    """Bytes of the distinct tensors (parameters and buffers) a module holds, less those of its submodules of
    the ``skip`` types."""
    seen, total = {id(t) for m in module.modules() if isinstance(m, skip) for t in m.buffers()}, 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def fusible_activation(module: nn.Module) -> str | None:
    """The kernel epilogue that computes ``module`` exactly ("relu" / "gelu"), or None."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    # transformers.activations.GELUActivation with the exact erf GELU
    if type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is torch.nn.functional.gelu:
        return "gelu"
    return None
