"""SparseLinear (fp32 csr / nm24) and SparseInt8Linear (int8 bsr1x4): Linear layers on the sparse kernels.

The packs are registered buffers, so ``state_dict`` / ``load_state_dict`` work; the number of stored
nonzeros is data dependent, so loading resizes the buffers to the incoming pack and validates its
structure before any kernel can see it (the ops re-check it on every call anyway, memoized; see
pycompress/ops/sparse.py).
"""

from __future__ import annotations

import operator
from types import SimpleNamespace

import torch
from torch import nn

from pycompress import _C, ops
from pycompress._native import activation_code, isa_at_least, num_threads
from pycompress.nn.checks import (
    check_finite_bias,
    check_scales,
    check_structure,
    features_problems,
    file_tensor,
    gemm_config_problems,
    raise_problems,
)
from pycompress.nn.int8_conv import build_lowered
from pycompress.nn.int8_linear import quantize_with_scale
from pycompress.nn.registry import (CompressedLayer, Format, QuantParams, half_on_cpu, register_format,
                                     register_layer)
from pycompress.ops.q8 import eager_rows, kernel_dtype
from pycompress.ops.sparse import (
    build_bsr1x4_panels,
    CSR_PANEL_MIN_ROWS,
    build_sliced,
    csr_panels_for,
    csr_panels_supported,
    ensure_valid_structure,
    sliced_linear_plan,
    sparse_int8_linear_cpu,
    sparse_linear_csr_cpu,
    sparse_linear_nm24_cpu,
    sliced_steps,
)
from pycompress.reference.q8 import quantize_weight_per_channel, round_up
from pycompress.reference.sparse import (
    FORMATS_FP32,
    FORMATS_INT8,
    MAX_K,
    NM_PER_WORD,
    is_nm24,
    pack_bsr1x4,
    pack_csr,
    pack_nm24,
    unpack_bsr1x4,
    unpack_csr,
    unpack_nm24,
)

# Buffers whose length is the number of stored nonzeros / blocks (resized on load).
_NNZ_BUFFERS = ("col_idx", "blk_idx", "values")


_data_ptr = torch.Tensor.data_ptr


def _eager_cpu(x: torch.Tensor) -> bool:
    # Eager CPU calls skip the dispatcher (~9 us); traced or fake tensors take the op.
    return type(x) is torch.Tensor and x.device.type == "cpu" and not torch.compiler.is_compiling()


class _SparseBase(CompressedLayer):
    LOWERS_CONV = True

    def __init__(self, in_features: int, out_features: int, activation: str, name: str | None) -> None:
        super().__init__()
        if not 1 <= in_features <= MAX_K:
            raise ValueError(f"{type(self).__name__}({name or ''}): in_features={in_features} must be in "
                             f"[1, {MAX_K}] (uint16 column indices); split the layer along K")
        if out_features < 1:
            raise ValueError(f"{type(self).__name__}({name or ''}): out_features={out_features} must be >= 1")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self._act_code = activation_code(activation)
        self.name = name
        # kind of derived layout -> the pack stamp it was built from (see _derived)
        self._derived_stamps: dict[str, tuple] = {}

    # The structural buffers the derived layouts are built from (their stamp, _pack_stamp).
    _PACK_BUFFERS: tuple[str, ...] = ()

    def _pack_stamp(self) -> tuple:
        """Addresses and version counters of the pack's buffers: a derived layout is rebuilt when this
        changes. Inference tensors have no version counter (and cannot be written outside inference mode).
        Runs on every call: buffers from the dict, no generator."""
        r, i, v = map(self._buffers.__getitem__, self._PACK_BUFFERS)
        if r.is_inference() or i.is_inference() or v.is_inference():
            return (r.data_ptr(), i.data_ptr(), v.data_ptr(), None)
        return (r.data_ptr(), r._version, i.data_ptr(), i._version, v.data_ptr(), v._version)

    def _derived(self, kind: str, names: tuple[str, ...], build, stamp=None) -> tuple:
        """Non-persistent buffers ``names`` derived from the pack by ``build()``, built by the first call that
        needs them and rebuilt whenever the pack changed (a corrupt pack raises ValueError naming the layer).
        A build returns its own tensors: a concurrent first call may be registering its equal copy."""
        stamp = self._pack_stamp() if stamp is None else stamp
        if stamp != self._derived_stamps.get(kind):
            try:
                # Normal tensors even under inference_mode: their structural check is then memoized per
                # version (inference tensors have no version counter and would be re-checked every call).
                with torch.inference_mode(False):
                    tensors = tuple(build())
            except ValueError as e:
                raise ValueError(f"{self._label()}: {e}") from None
            for name, t in zip(names, tensors):
                self.register_buffer(name, t, persistent=False)
            self._derived_stamps[kind] = stamp
            return tensors
        return tuple(map(self._buffers.__getitem__, names))

    def _label(self) -> str:
        inner = self.name if self.name else f"{self.in_features}->{self.out_features}"
        return f"{type(self).__name__}({inner})"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"{self._label()}: input has shape {tuple(x.shape)}, expected (..., {self.in_features}) "
                             "features")
        if not kernel_dtype(x):
            raise TypeError(f"{self._label()}: input dtype {x.dtype}, expected torch.float32 (on CUDA also "
                            "float16 or bfloat16)")

    def packed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in _NNZ_BUFFERS:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name, None)
            if (incoming is not None and current is not None and current.dim() == 1 and incoming.dim() == 1
                    and incoming.shape != current.shape):
                setattr(self, name, torch.empty(incoming.shape, dtype=current.dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.validate()

    def validate(self) -> None:
        """Checks the pack's structure (raises ValueError naming the layer)."""

    # Index arrays of the pack (Deep Compression's "pruned" stage counts them beside the values).
    _INDEX_BUFFERS = ("row_ptr", "col_idx", "blk_idx", "nm_idx")

    def pruned_bytes(self) -> int:
        index = sum(b.numel() * b.element_size() for name, b in self._buffers.items()
                    if name in self._INDEX_BUFFERS and b is not None)
        bias = self.bias.numel() * 4 if self.bias is not None else 0
        return self.values.numel() * 4 + index + bias

    @classmethod
    def _shape(cls, cfg: dict, where: str, shape: tuple[int, int] | None) -> tuple[int, int]:
        if shape is None:
            raise_problems(cls.config_problems(cfg) + features_problems(cfg), where)
            shape = (cfg["in_features"], cfg["out_features"])
        return shape


_PANEL_BUFFERS = ("panel_sub", "panel_idx", "panel_values")


@register_layer
class SparseLinear(_SparseBase):
    """y = act(x @ W^T + b) with fp32 sparse weights.

    Formats: ``csr`` (unstructured; uint16 column indices) or ``nm24`` (2:4, two values per group of 4 k and
    2-bit indices). Buffers: csr ``row_ptr``, ``col_idx``, ``values``; nm24 ``nm_idx``, ``values``; ``bias``.

    A csr layer also derives the csr panel layout (csrc/sparse/sparse.h: the nonzeros reordered by K panels
    so the transposed activations stay in L1/L2, about the size of the pack again) into non-persistent
    buffers ``panel_*``: built by the first eager call with M >= 2 (so decode-only users, M = 1, never pay
    its memory) and rebuilt whenever the pack changes; those calls pass it to the kernels, which use it on
    AVX-512 and AVX2 (4096x4096 at 90%, AVX2 path on Zen 4, 1 thread, µs plain / panels: M=4 1315/919,
    M=16 1333/1211, M=128 13751/9220; from M=2 to 8 with 8-float activation rows, both paths: AVX-512 M=2
    1240 -> 783, M=3 1846 -> 786, M=8 970 -> 791). ``packed_bytes()`` counts the pack, ``panel_bytes()``
    the derived copy (0 until built). The layout is the op's own of the pack
    (``pycompress.ops.sparse.csr_panels_for``), which traced calls (torch.compile, torch.export) read too: eager
    and traced calls run the same kernel and give the same bits.
    """

    _PACK_BUFFERS = ("row_ptr", "col_idx", "values")  # csr (nm24 has no derived layout)
    ENTROPY_CODED = ("row_ptr", "col_idx", "nm_idx")
    weight_bits = 32
    # The kernels read the panel layout from M = 2 (M = 1 runs the gather kernel).
    _PANEL_MIN_ROWS = CSR_PANEL_MIN_ROWS

    def __init__(self, in_features: int, out_features: int, nnz: int = 0, format: str = "csr", bias: bool = True,
                 activation: str = "none", name: str | None = None) -> None:
        super().__init__(in_features, out_features, activation, name)
        if format not in FORMATS_FP32:
            raise ValueError(f"{self._label()}: format {format!r} not in {FORMATS_FP32}")
        self.format = format
        if format == "csr":
            self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.int32))
            self.register_buffer("col_idx", torch.zeros(nnz, dtype=torch.uint16))
            self.register_buffer("values", torch.zeros(nnz, dtype=torch.float32))
        else:
            if in_features % 4:
                raise ValueError(f"{self._label()}: nm24 needs in_features % 4 == 0, got {in_features}")
            words = (in_features // 2 + NM_PER_WORD - 1) // NM_PER_WORD
            self.register_buffer("nm_idx", torch.zeros(out_features, words, dtype=torch.uint32))
            self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Module, format: str = "auto", activation: str = "none",
                   name: str | None = None) -> "SparseLinear":
        """Packs the nonzeros of ``linear.weight`` (its zeros are the pruning mask).

        ``format="auto"`` picks nm24 when the weight is 2:4 sparse (fewer index bytes, no row pointers) and
        csr otherwise.
        """
        weight, b, label = _float_weight(cls, linear, name)
        n, k = weight.shape
        if format == "auto":
            format = "nm24" if is_nm24(weight) else "csr"
        if format == "csr":
            row_ptr, col_idx, values = pack_csr(weight)
            mod = cls(k, n, nnz=values.numel(), format="csr", bias=b is not None, activation=activation, name=name)
            mod.row_ptr.copy_(row_ptr)
            mod.col_idx.copy_(col_idx)
            mod.values.copy_(values)
        elif format == "nm24":
            if not is_nm24(weight):
                raise ValueError(f"{label}: weight is not 2:4 sparse with K % 4 == 0; use format='csr'")
            values, nm_idx = pack_nm24(weight)
            mod = cls(k, n, format="nm24", bias=b is not None, activation=activation, name=name)
            mod.nm_idx.copy_(nm_idx)
            mod.values.copy_(values)
        else:
            raise ValueError(f"{label}: format {format!r} not in {FORMATS_FP32 + ('auto',)}")
        if b is not None:
            mod.bias.copy_(b)
        mod.validate()
        return mod

    def validate(self) -> None:
        if self.format != "csr":
            return
        try:
            ensure_valid_structure("sparse_linear_csr", self.row_ptr, self.col_idx, self.in_features,
                                   _C.sparse_validate_csr)
        except ValueError as e:
            raise ValueError(f"{self._label()}: {e}") from None

    # ---------------------------------------------------------------- the format (pycompress.nn.registry)

    format_name = "sparse-fp32"

    def dequantized_weight(self) -> torch.Tensor:
        if self.format == "csr":
            return unpack_csr(self.row_ptr, self.col_idx, self.values, self.in_features)
        return unpack_nm24(self.values, self.nm_idx, self.in_features)

    def config(self) -> dict:
        # The number of stored nonzeros comes from the file's tensors.
        return {"bias": self.bias is not None, "activation": self.activation, "name": self.name,
                "format": self.format, "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def config_problems(cls, cfg: dict) -> list[str]:
        return gemm_config_problems(cfg, quantized=False)

    @classmethod
    def from_config(cls, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str, where: str,
                    shape: tuple[int, int] | None = None) -> "SparseLinear":
        """Sized from the file's own index arrays, never from the manifest alone."""
        k, n = cls._shape(cfg, where, shape)
        common = {key: cfg.get(key) for key in ("bias", "activation", "name")}
        if cfg.get("format") == "csr":
            file_tensor(tensors, prefix + "row_ptr", torch.int32, n + 1, where)
            nnz = file_tensor(tensors, prefix + "col_idx", torch.uint16, None, where).numel()
            return cls(k, n, nnz=nnz, format="csr", **common)
        if cfg.get("format") == "nm24":
            if k % 4:
                raise ValueError(f"load: layer {where}: nm24 needs in_features % 4 == 0, got {k}")
            values = tensors.get(prefix + "values")
            if values is None or values.numel() != n * (k // 2):
                raise ValueError(f"load: layer {where}: nm24 with K={k}, N={n} needs {n * (k // 2)} values, the "
                                 f"file has {'none' if values is None else values.numel()}")
            return cls(k, n, format="nm24", **common)
        raise ValueError(f"load: layer {where}: format {cfg.get('format')!r} not in ('csr', 'nm24')")

    def validate_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
        """The structure (row_ptr from 0, non-decreasing, ending at the stored count, every index < K) with
        the same C++ validator the ops run, before anything else reads it; then the values the kernels trust."""
        k, n = self.in_features, self.out_features
        values = tensors[prefix + "values"]
        if self.format == "csr":
            check_structure("sparse_linear_csr", tensors[prefix + "row_ptr"], tensors[prefix + "col_idx"], k,
                            _C.sparse_validate_csr, where)
        else:
            # 2-bit indices cannot leave their group of 4; a pycompress pack holds two distinct ascending
            # positions per group (pack_nm24) and zero bits past the K/2 stored values.
            words = tensors[prefix + "nm_idx"].view(torch.int32)  # uint32 has few torch ops; the bits are the same
            fields = torch.stack([(words >> (2 * j)) & 3 for j in range(NM_PER_WORD)], dim=-1)
            fields = fields.reshape(n, -1)
            pairs = fields[:, : k // 2].reshape(n, -1, 2)
            if fields[:, k // 2:].any() or (pairs[..., 0] >= pairs[..., 1]).any():
                raise ValueError(f"load: {where}: nm24 indices are not two ascending positions per group of 4 "
                                 "with zero padding (corrupt file)")
        if not torch.isfinite(values).all():
            raise ValueError(f"load: {where}: sparse values have NaN or Inf")
        check_finite_bias(tensors, prefix, where)

    def _panels_for(self, m: int):
        """The csr panel layout when the kernels would use it for M rows."""
        if m < self._PANEL_MIN_ROWS or not csr_panels_supported(self.in_features):
            return None
        # The op's own layout of this pack (csr_panels_for): the traced op reads the same one, so eager and
        # traced calls give the same bits, and a module run both ways holds one copy.
        return self._derived("panels", _PANEL_BUFFERS, lambda: csr_panels_for(
            self.row_ptr, self.col_idx, self.values, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32 and half_on_cpu(x):
            return self.forward(x.float()).to(x.dtype)
        self._check_input(x)
        b = self._buffers  # not nn.Module.__getattr__ (~0.6 us a buffer on every call)
        if self.format == "csr":
            args = (x, b["row_ptr"], b["col_idx"], b["values"], b["bias"], self._act_code)
            if _eager_cpu(x):
                return sparse_linear_csr_cpu(*args, panels=self._panels_for(x.numel() // self.in_features))
            return ops.sparse_linear_csr(*args)
        args = (x, b["nm_idx"], b["values"], b["bias"], self._act_code)
        return sparse_linear_nm24_cpu(*args) if _eager_cpu(x) else ops.sparse_linear_nm24(*args)

    def packed_bytes(self) -> int:
        """Bytes of the pack (the state_dict); the derived panel layout is ``panel_bytes()``."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if not name.startswith("panel_"))

    def panel_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name.startswith("panel_"))

    def nnz(self) -> int:
        return int(self.values.numel()) if self.format == "csr" else int((self.values != 0).sum())

    def extra_repr(self) -> str:
        density = self.nnz() / (self.in_features * self.out_features)
        act = "" if self.activation == "none" else f", activation={self.activation}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}, weights=fp32, density={density:.2%}, bytes={self.packed_bytes()}{act}")


@register_layer
class SparseInt8Linear(_SparseBase):
    """y = act(dequant(quant(x) @ W_q^T) + b) with int8 weights in 1x4 blocks along K (bsr1x4).

    Numbers are exactly those of :class:`pycompress.nn.Int8Linear` (symmetric per-channel int8 weights,
    uint8 activations quantized per row at run time or with a static scale / zero point): on the same
    weights the two give bit-identical outputs. Unstructured sparsity and 1x4 block pruning both pack into
    bsr1x4; a block is stored when any of its 4 weights is nonzero. Buffers: ``row_ptr``, ``blk_idx``,
    ``values``, ``col_sum``, ``w_scale``, ``bias`` (the state_dict), plus the sliced layout derived from
    them when a call first needs one (non-persistent buffers ``sliced_*``, ``byte_*``, ``panel_*``, rebuilt
    after loading or any in-place change of the pack; the kernel choice needs only their step counts).

    Kernel choice per call (csrc/sparse/sparse.h): the sliced kernel costs one vpermd + vpdpbusd per row
    and step (16 channel lanes, ``fill`` of them real blocks); the bsr1x4 kernels cost one gather per row
    and 16 blocks (M < 4) or one vpdpbusd per block and 16 rows (M >= 4), the latter over the bsr1x4 panel
    layout on AVX-512 (x^T panels kept in L1/L2). Measured on Zen 4, one thread, 4096x4096 at 90%
    unstructured (µs, bsr1x4 / bsr1x4 panels / sliced / dense int8): M=1 717/-/132/307, M=4 889/743/277/362,
    M=8 904/751/542/687, M=16 1004/772/1110/1339, M=32 2375/1508/2286/2610, M=128 9604/6199/8832/9944.
    So on AVX-512 the sliced kernel runs for M <= 8 when it needs few enough steps (M * steps <=
    1.4 * blocks; 1x4-block pruned packs fill fewer lanes), the panel kernel for the other M >= 4. The
    AVX2 sliced kernel handles one row at a time (two vpermd and a blend per half step): 1x4 blocks M=1
    327/158 (bsr1x4 / sliced), M=4 629/579, M=16 733/6456; so below AVX-512 it runs only for M <= 4, and
    there is no panel kernel.

    The panel layout (non-persistent buffers ``panel_*``, ``panel_bytes()``) is built by the first eager call
    that runs the panel kernel, so decode-only users (M < 4) never hold it; it is rebuilt whenever the pack
    changes.

    On AVX-512 with VBMI (Ice Lake, Zen 4 and later), unstructured packs run the **byte** sliced layout
    instead, for every M: each lane of a step takes up to 4 single nonzeros anywhere in a 64-byte window
    (one vpermb gathers them), so a step carries ~49 nonzeros where a 1x4-block step carries ~16. Same
    4096x4096 layer, one thread (µs, groups / bytes, bit-identical outputs): M=1 140/68, M=4 307/130,
    M=16 1172/457, M=128 9172/3601 (panels 6036). It is used when it needs at most
    ``_BYTE_STEP_RATIO`` of the group layout's steps (1x4-block pruned packs need about as many, in more
    bytes, and keep the kernels above; ``byte_sliced_bytes()``).
    """

    # Sliced kernel when M <= max rows (per ISA) and M * steps <= _SLICED_STEP_RATIO * blocks (see above).
    _SLICED_MAX_ROWS = 8
    _SLICED_MAX_ROWS_BELOW_AVX512 = 4
    _SLICED_STEP_RATIO = 1.4
    # The bsr1x4 kernels read the panel layout for M >= 4 (below, the gather kernel runs).
    _PANEL_MIN_ROWS = 4
    # The byte sliced layout runs (every M, where vectorized) when it needs at most this share of the
    # group layout's steps: a byte step is 130 bytes against 74, so below ~0.57 it also streams fewer bytes.
    _BYTE_STEP_RATIO = 0.6
    _PACK_BUFFERS = ("row_ptr", "blk_idx", "values")
    ENTROPY_CODED = ("values", "row_ptr", "blk_idx")
    _GROUP_BUFFERS = ("sliced_ptr", "sliced_base", "sliced_lane", "sliced_values")
    _BYTE_BUFFERS = ("byte_slice_ptr", "byte_step_base", "byte_step_pos", "byte_values")

    def __init__(self, in_features: int, out_features: int, nblocks: int = 0, bias: bool = True,
                 activation: str = "none", act_scale: float | None = None, act_zero_point: int = 0,
                 weight_bits: int = 8, name: str | None = None) -> None:
        super().__init__(in_features, out_features, activation, name)
        self.format = FORMATS_INT8[0]
        self.act_scale = act_scale
        self.act_zero_point = act_zero_point
        self.weight_bits = weight_bits
        self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.int32))
        self.register_buffer("blk_idx", torch.zeros(nblocks, dtype=torch.uint16))
        self.register_buffer("values", torch.zeros(4 * nblocks, dtype=torch.int8))
        self.register_buffer("col_sum", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self._steps_stamp = None
        self._steps = (0, 0)
        self._plans: dict[bool, tuple] = {}  # per sliced layout: (operands, key, native plan); see _sliced_plan

    @classmethod
    def from_float(cls, linear: nn.Module, activation: str = "none", act_scale: float | None = None,
                   act_zero_point: int = 0, weight_bits: int = 8, name: str | None = None) -> "SparseInt8Linear":
        """Quantizes ``linear.weight`` per output channel and packs its nonzero 1x4 blocks."""
        weight, b, _ = _float_weight(cls, linear, name)
        n, k = weight.shape
        q, scale = quantize_weight_per_channel(weight, bits=weight_bits)
        row_ptr, blk_idx, values, col_sum = pack_bsr1x4(q)
        mod = cls(k, n, nblocks=blk_idx.numel(), bias=b is not None, activation=activation, act_scale=act_scale,
                  act_zero_point=act_zero_point, weight_bits=weight_bits, name=name)
        for buf, src in ((mod.row_ptr, row_ptr), (mod.blk_idx, blk_idx), (mod.values, values),
                         (mod.col_sum, col_sum), (mod.w_scale, scale)):
            buf.copy_(src)
        if b is not None:
            mod.bias.copy_(b)
        mod.validate()
        return mod

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, weight_scale: torch.Tensor | None = None,
                    name: str | None = None, **kwargs) -> "SparseInt8Linear":
        """SparseInt8Linear for a 2-D float weight; ``weight_scale`` [out] uses a calibrated per-channel
        scale (from ``pycompress.quantize``) as ``Int8Linear.from_weight`` does, so both int8 formats
        quantize a layer to the same integers."""
        if weight_scale is None:
            return cls.from_float(SimpleNamespace(weight=weight, bias=bias), name=name, **kwargs)
        n, k = weight.shape
        q, scale = quantize_with_scale(weight, weight_scale, kwargs.get("weight_bits", 8),
                                       f"SparseInt8Linear({name or ''})")
        row_ptr, blk_idx, values, col_sum = pack_bsr1x4(q)
        mod = cls(k, n, nblocks=blk_idx.numel(), bias=bias is not None, name=name, **kwargs)
        for buf, src in ((mod.row_ptr, row_ptr), (mod.blk_idx, blk_idx), (mod.values, values),
                         (mod.col_sum, col_sum), (mod.w_scale, scale)):
            buf.copy_(src)
        if bias is not None:
            mod.bias.copy_(bias.detach().to(torch.float32))
        mod.validate()
        return mod

    # ---------------------------------------------------------------- the format (pycompress.nn.registry)

    format_name = "sparse-int8"

    def dequantized_weight(self) -> torch.Tensor:
        return self.integer_weight().to(torch.float32) * self.w_scale[:, None]

    # The pack holds exactly the 1x4 blocks with a nonzero weight (pack_bsr1x4), so the integer weights
    # alone rebuild it; save checks that before storing them in place of the pack.
    INTEGER_DERIVED = ("row_ptr", "blk_idx", "values", "col_sum")

    def integer_weight(self) -> torch.Tensor:
        return unpack_bsr1x4(self.row_ptr, self.blk_idx, self.values, self.in_features)

    @classmethod
    def derive_from_integer_weight(cls, q: torch.Tensor, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str,
                                   where: str) -> dict[str, torch.Tensor]:
        if q.shape[1] > MAX_K:
            raise ValueError(f"load: {where}: K={q.shape[1]} exceeds {MAX_K}, the uint16 column index range")
        row_ptr, blk_idx, values, col_sum = pack_bsr1x4(q)
        return {"row_ptr": row_ptr, "blk_idx": blk_idx.to(torch.uint16), "values": values, "col_sum": col_sum}

    def config(self) -> dict:
        return {"bias": self.bias is not None, "activation": self.activation, "name": self.name,
                "act_scale": self.act_scale, "act_zero_point": self.act_zero_point, "weight_bits": self.weight_bits,
                "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def config_problems(cls, cfg: dict) -> list[str]:
        return gemm_config_problems(cfg, quantized=True)

    @classmethod
    def from_config(cls, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str, where: str,
                    shape: tuple[int, int] | None = None) -> "SparseInt8Linear":
        """Sized from the file's own index arrays, never from the manifest alone."""
        k, n = cls._shape(cfg, where, shape)
        file_tensor(tensors, prefix + "row_ptr", torch.int32, n + 1, where)
        nblocks = file_tensor(tensors, prefix + "blk_idx", torch.uint16, None, where).numel()
        return cls(k, n, nblocks=nblocks, act_scale=cfg.get("act_scale"), act_zero_point=cfg["act_zero_point"],
                   weight_bits=cfg["weight_bits"], **{key: cfg.get(key) for key in ("bias", "activation", "name")})

    def validate_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
        """The structure with the ops' own C++ validator first, then the values, col_sum, the last block's
        padding, the scales and the bias."""
        k, n = self.in_features, self.out_features
        row_ptr, blk_idx, values = tensors[prefix + "row_ptr"], tensors[prefix + "blk_idx"], tensors[prefix + "values"]
        check_structure("sparse_int8_linear", row_ptr, blk_idx, k, _C.sparse_validate_bsr1x4, where)
        qmax = 2 ** (self.weight_bits - 1) - 1
        blocks = values.view(-1, 4)
        if blocks.numel() and (blocks.min() < -qmax or blocks.max() > qmax):
            raise ValueError(f"load: {where}: sparse int8 values leave the symmetric int{self.weight_bits} range "
                             f"[-{qmax}, {qmax}]")
        if k % 4 and blocks[blk_idx.to(torch.int64) == k // 4, k % 4:].any():
            raise ValueError(f"load: {where}: the last 1x4 block of a row holds nonzeros past K={k} (corrupt file)")
        rows = torch.repeat_interleave(torch.arange(n), row_ptr.diff().to(torch.int64))
        row_sums = torch.zeros(n, dtype=torch.int32).index_add_(0, rows, blocks.sum(dim=1, dtype=torch.int32))
        if not torch.equal(row_sums, tensors[prefix + "col_sum"]):
            raise ValueError(f"load: {where}: col_sum does not match the sparse int8 values (corrupt file)")
        check_scales(tensors[prefix + "w_scale"], where)
        check_finite_bias(tensors, prefix, where)

    def validate(self) -> None:
        try:
            ensure_valid_structure("sparse_int8_linear", self.row_ptr, self.blk_idx, self.in_features,
                                   _C.sparse_validate_bsr1x4)
        except ValueError as e:
            raise ValueError(f"{self._label()}: {e}") from None

    def _layout_steps(self, stamp=None) -> tuple[int, int]:
        """Steps of the group and of the byte sliced layouts of the current pack (two counting passes,
        once per pack version): what the kernel choice needs, without building either layout."""
        stamp = self._pack_stamp() if stamp is None else stamp
        if stamp != self._steps_stamp:
            try:
                with torch.inference_mode(False):
                    self._steps = tuple(sliced_steps(self.row_ptr, self.blk_idx, self.values, self.in_features, byte)
                                        for byte in (False, True))
            except ValueError as e:
                raise ValueError(f"{self._label()}: {e}") from None
            self._steps_stamp = stamp
        return self._steps

    def _sliced_layout(self, byte_layout: bool, stamp=None) -> tuple:
        """The group (``sliced_*``) or byte (``byte_*``) sliced layout of the current pack."""
        return self._derived("byte" if byte_layout else "sliced",
                             self._BYTE_BUFFERS if byte_layout else self._GROUP_BUFFERS,
                             lambda: build_sliced(self.row_ptr, self.blk_idx, self.values, self.in_features,
                                                  byte_layout), stamp)

    def _panels_for(self, m: int, stamp=None):
        """The bsr1x4 panel layout when the kernels would use it for M rows (AVX-512, M >= 4)."""
        if m < self._PANEL_MIN_ROWS or not isa_at_least("avx512vnni"):
            return None
        return self._derived("panels", _PANEL_BUFFERS, lambda: build_bsr1x4_panels(
            self.row_ptr, self.blk_idx, self.values, self.in_features), stamp)

    def _sliced_plan(self, byte_layout: bool, stamp) -> tuple:
        """The record (operands, key, native plan) of a sliced layout and the current weight-side buffers
        and activation settings, rebuilt (and validated again) when any of them was replaced, moved or
        rebuilt. The record holds the tensors the plan points into: a caller keeps the record, not just the
        plan, until its run returns (a concurrent first call may replace the module's record and buffers)."""
        layout = self._sliced_layout(byte_layout, stamp)
        b = self._buffers
        col_sum, w_scale, bias = b["col_sum"], b["w_scale"], b["bias"]
        operands = (*layout, col_sum, w_scale, bias)
        # Runs on every small-M call: no generators (each costs ~0.5 us here).
        key = (*map(_data_ptr, layout), col_sum.data_ptr(), w_scale.data_ptr(),
               0 if bias is None else bias.data_ptr(), self._act_code, self.act_scale, self.act_zero_point)
        r = self._plans.get(byte_layout)
        if r is not None and r[1] == key and all(map(operator.is_, r[0], operands)):
            return r
        plan = sliced_linear_plan(self.in_features, *operands, self._act_code, self.act_scale, self.act_zero_point)
        record = (operands, key, plan)
        self._plans[byte_layout] = record
        return record

    def __getstate__(self) -> dict:
        # Native plans hold raw pointers: never copied or pickled, rebuilt on the next call.
        state = dict(super().__getstate__())
        state["_plans"] = {}
        return state

    def _use_byte_layout(self, m: int, stamp=None) -> bool:
        """The byte sliced layout runs when the active ISA vectorizes it and it needs at most
        _BYTE_STEP_RATIO of the group layout's steps (class docstring)."""
        if m < 1 or not _C.sparse_sliced_bytes_vectorized():
            return False
        group_steps, byte_steps = self._layout_steps(stamp)
        return byte_steps <= self._BYTE_STEP_RATIO * group_steps

    def _use_sliced(self, m: int, stamp=None) -> bool:
        """The group sliced layout runs for small M when it needs few enough steps (class docstring)."""
        if not 0 < m <= self._SLICED_MAX_ROWS:
            return False
        max_rows = self._SLICED_MAX_ROWS if isa_at_least("avx512vnni") else self._SLICED_MAX_ROWS_BELOW_AVX512
        group_steps, _ = self._layout_steps(stamp)
        return m <= max_rows and m * group_steps <= self._SLICED_STEP_RATIO * self._buffers["blk_idx"].numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32 and half_on_cpu(x):
            return self.forward(x.float()).to(x.dtype)
        self._check_input(x)
        b = self._buffers  # not nn.Module.__getattr__ (~0.6 us a buffer on every call)
        if _eager_cpu(x):
            m = x.numel() // self.in_features
            stamp = self._pack_stamp()
            byte_layout = self._use_byte_layout(m, stamp)
            if byte_layout or self._use_sliced(m, stamp):
                # The sliced kernels through the layer's native plan (checks and validation done once).
                record = self._sliced_plan(byte_layout, stamp)  # held until the run returns
                x2, m, ldx = eager_rows(x, self.in_features)
                n = self.out_features
                y = torch.empty(m, n, dtype=torch.float32)
                record[2].run(x2.data_ptr(), m, ldx, y.data_ptr(), num_threads())
                return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
            weights = (b["col_sum"], b["w_scale"], b["bias"], self._act_code, self.act_scale, self.act_zero_point)
            return sparse_int8_linear_cpu(x, b["row_ptr"], b["blk_idx"], b["values"], *weights,
                                          panels=self._panels_for(m, stamp))
        # Traced graphs take the bsr1x4 op for every M: the per-call kernel choice reads the run-time ISA,
        # which dynamo cannot trace (the sliced op itself is traceable: ops.sparse_int8_linear_sliced).
        return ops.sparse_int8_linear(x, b["row_ptr"], b["blk_idx"], b["values"], b["col_sum"], b["w_scale"],
                                      b["bias"], self._act_code, self.act_scale, self.act_zero_point)

    def packed_bytes(self) -> int:
        """Bytes of the bsr1x4 pack (the state_dict); the derived copies are ``sliced_bytes()``,
        ``panel_bytes()`` and ``byte_sliced_bytes()``."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers()
                   if not name.startswith(("sliced_", "panel_", "byte_")))

    def sliced_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name.startswith("sliced_"))

    def byte_sliced_bytes(self) -> int:
        """Bytes of the byte sliced layout (0 until a call builds it, or where it is not used)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name.startswith("byte_"))

    def panel_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name.startswith("panel_"))

    def extra_repr(self) -> str:
        nblocks = self.blk_idx.numel()
        kp = round_up(self.in_features, 4)
        block_density = nblocks / (self.out_features * kp // 4)
        density = int((self.values != 0).sum()) / (self.in_features * self.out_features)
        acts = "dynamic per-row" if self.act_scale is None else f"static scale={self.act_scale:.4g} zp={self.act_zero_point}"
        act = "" if self.activation == "none" else f", activation={self.activation}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format=bsr1x4, weights=int{self.weight_bits} per-channel, activations=uint8 {acts}, "
                f"density={density:.2%}, block_density={block_density:.2%}, bytes={self.packed_bytes()}, "
                f"sliced_bytes={self.sliced_bytes()}"
                + (f", byte_sliced_bytes={self.byte_sliced_bytes()}" if self.byte_sliced_bytes() else "") + act)


def _float_weight(cls, linear: nn.Module, name: str | None):
    label = f"{cls.__name__}.from_float({name or type(linear).__name__})"
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{label}: expected a module with a 2-D weight, got "
                         f"{None if weight is None else tuple(weight.shape)}")
    weight = weight.detach().to(torch.float32).cpu()
    if not torch.isfinite(weight).all():
        raise ValueError(f"{label}: weight has NaN or Inf; a sparse pack stores only finite weights")
    if weight.shape[1] > MAX_K:
        raise ValueError(f"{label}: in_features={weight.shape[1]} exceeds {MAX_K}, the uint16 column index range; "
                         "split the layer along K")
    b = getattr(linear, "bias", None)
    if b is not None:
        b = b.detach().to(torch.float32).cpu()
        if not torch.isfinite(b).all():
            raise ValueError(f"{label}: bias has NaN or Inf")
    return weight, b, label


def _build_sparse_fp32(layer: nn.Module, name: str | None, quant: QuantParams) -> CompressedLayer:
    # fp32 values: a quantized layer asked for sparse-fp32 drops its int8 numbers.
    return build_lowered(layer, name, lambda w, b: SparseLinear.from_float(SimpleNamespace(weight=w, bias=b),
                                                                           name=name))


def _build_sparse_int8(layer: nn.Module, name: str | None, quant: QuantParams) -> CompressedLayer:
    # One format for both activation modes: a calibrated layer gets its static scale.
    kwargs = {"weight_bits": quant.weight_bits, "weight_scale": quant.weight_scale}
    if quant.act_scale is not None:
        kwargs.update(act_scale=quant.act_scale, act_zero_point=quant.act_zero_point)
    return build_lowered(layer, name, lambda w, b: SparseInt8Linear.from_weight(w, b, name=name, **kwargs))


register_format(Format("sparse-fp32", False, _build_sparse_fp32, "SparseLinear: fp32 csr, or nm24 for 2:4 weights"))
register_format(Format("sparse-int8", True, _build_sparse_int8, "SparseInt8Linear: int8 1x4 blocks (bsr1x4)"))
