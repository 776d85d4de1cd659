"""pycompress.save / pycompress.load: one safetensors file, a JSON manifest in its metadata, no pickle.

The manifest (metadata key ``pycompress``) holds:
- ``layers``: for every pycompress layer, its class and constructor config (shapes, strides,
  activation parameters, bits);
- ``architecture``: the whole module tree when every module in it is a plain ``torch.nn``
  building block from ``REBUILDABLE`` (Sequential models), so ``load(path)`` can rebuild it
  without code; otherwise null, and ``load(path, model=float_skeleton)`` converts a freshly
  built float model of the same architecture following the manifest;
- ``aliases``: state-dict keys that share one tensor (shared modules), stored once;
- ``record``: the conversion record, so ``pycompress.summary`` still explains each layer;
- ``entropy``: with ``save(..., entropy_coding=True)`` (Deep Compression's last stage), the tensors
  stored Huffman-coded (``pycompress.entropy``): ``{key: {dtype, shape, count}}``; the file holds
  the payload under ``key`` and the 256 code lengths under ``key + "/huffman_lengths"``.

Nothing from the file reaches a kernel before it is checked: entropy-coded tensors are decoded
first (a corrupt stream or code is refused by the decoder, and a stream cannot claim more symbols
than its payload holds bits), then every tensor's dtype and shape against the module the manifest
describes (a sparse layer is sized from the file's own index arrays), no missing or extra tensors,
and the operands' invariants: packed int8 weights in the symmetric range, zero padding, ``col_sum``
equal to the packed columns' sums, finite positive scales, finite bias, static scale / zero point
in range; for sparse packs, first the structure with the ops' own C++ validator (row_ptr from 0,
non-decreasing, ending at the stored count, every index < K), then the values, ``col_sum``, the
last block's padding and nm24's index pairs.

Format versions (``FORMAT_VERSIONS``, the one list): ``save`` writes the newest; ``load`` reads every
version from 1 to the newest, and refuses a newer file with both versions named (upgrade pycompress).
Files of every version stay loadable: ``tests/data/golden/`` holds files each version wrote, and
``tests/test_golden.py`` loads them and checks their outputs bit for bit on every ISA path.

Checksums (version 2): the manifest's ``checksums`` holds the sha256 (hex) of every stored tensor's
bytes as they lie in the file (for an entropy-coded tensor, its payload and its code lengths), and the
metadata key ``pycompress_sha256`` the sha256 of the manifest's JSON text. ``load`` checks both
before anything reads a tensor (before the entropy decoder, the validators above and any kernel): a
mismatch is refused naming the tensor and its layer. A version-1 file has no checksums; it is still
loaded and validated as above.

``save`` never leaves a half-written file at ``path``: it writes a temporary file in the
same directory, flushes it to disk and renames it over ``path`` (atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import tempfile
from dataclasses import asdict

import torch
from torch import nn

from pycompress import _C
from pycompress._native import ACTIVATIONS, build_info
from pycompress.conversion import (
    ConversionRecord,
    LayerRecord,
    _target_kind,
    conversion_record,
    converted_layers,
    fusible_activation,
    restore_shared_inputs,
)
from pycompress.attention import use_fused_attention
from pycompress.entropy import HuffmanCoded, huffman_decode, huffman_encode
from pycompress.nn.int8_conv import Im2colConv2d, Int8Conv2d
from pycompress.nn.int8_linear import Int8Linear
from pycompress.nn.sparse_linear import SparseInt8Linear, SparseLinear
from pycompress.ops.sparse import ensure_valid_structure
from pycompress.reference.q8 import KGROUP, MAX_K, PANEL, round_up
from pycompress.reference.sparse import NM_PER_WORD

MANIFEST_KEY = "pycompress"
MANIFEST_DIGEST_KEY = "pycompress_sha256"  # metadata key: sha256 of the manifest's JSON text (version >= 2)
# Every manifest format version this pycompress reads, and what it added. save writes the newest; load
# reads them all (tests/data/golden/v<N>/ holds files of version N). Add a version when a file written
# now would be misread by an older load, never change what an old version means.
FORMAT_VERSIONS = {
    1: "the manifest (layers, architecture, aliases, fused, record, entropy) and the tensors",
    2: "checksums: the sha256 of every stored tensor's bytes in the manifest, and of the manifest itself",
}
MANIFEST_VERSION = max(FORMAT_VERSIONS)
CHECKSUMS_SINCE = 2  # the first version whose files must carry checksums

# Plain torch.nn modules load(path) may rebuild from their constructor arguments.
REBUILDABLE: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in (
    nn.Sequential, nn.ModuleList, nn.Linear, nn.Conv2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.LayerNorm, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Softmax,
)}
_JSON_SCALARS = (bool, int, float, str, type(None))

# What entropy_coding stores Huffman-coded: the integer weights and the sparse index arrays (as bytes),
# whose byte histograms are far from uniform after pruning and quantization. fp32 values, scales and
# biases are left as they are (their bytes are close to uniform).
ENTROPY_CODED_BUFFERS: dict[type[nn.Module], tuple[str, ...]] = {
    Int8Linear: ("w_packed",),
    SparseInt8Linear: ("values", "row_ptr", "blk_idx"),
    SparseLinear: ("row_ptr", "col_idx", "nm_idx"),
}
HUFFMAN_LENGTHS_SUFFIX = "/huffman_lengths"
_CODED_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.int8, torch.uint8, torch.uint16, torch.int32,
                                                            torch.uint32)}


# ---------------------------------------------------------------- manifest: pycompress layers


def _conv_geometry(module: Im2colConv2d) -> dict:
    return {"in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size), "stride": list(module.stride), "padding": list(module.padding),
            "dilation": list(module.dilation)}


def _layer_config(module: nn.Module) -> dict:
    if isinstance(module, Im2colConv2d) and not isinstance(module, Int8Conv2d):
        # A conv lowered onto a sparse GEMM module: the geometry here, the GEMM's own entry inside.
        return {**_conv_geometry(module), "name": module.name,
                "gemm": {"type": type(module.gemm).__name__, "config": _layer_config(module.gemm)}}
    gemm = module.gemm if isinstance(module, Int8Conv2d) else module
    cfg = {"bias": gemm.bias is not None, "activation": gemm.activation, "name": gemm.name}
    if isinstance(gemm, SparseLinear):
        cfg["format"] = gemm.format  # the number of stored nonzeros comes from the file's tensors
    else:
        cfg.update(act_scale=gemm.act_scale, act_zero_point=gemm.act_zero_point, weight_bits=gemm.weight_bits)
    if isinstance(module, Int8Conv2d):
        cfg.update(_conv_geometry(module))
    else:
        cfg.update(in_features=module.in_features, out_features=module.out_features)
    return cfg


def _is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _pair_ok(v, lo: int) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x, lo, 1 << 20) for x in v)


def _check_packed_size(cfg: dict, k: int, n: int, packed: torch.Tensor | None, where: str) -> None:
    """Before a layer is allocated: its config must describe the packed weights the file really holds
    (so a manifest cannot ask for more memory than the file's own tensors)."""
    kp, np_ = round_up(k, KGROUP), round_up(n, PANEL)
    if packed is None or packed.numel() != kp * np_:
        got = "none" if packed is None else f"{packed.numel()} bytes"
        raise ValueError(f"load: layer {where}: config K={k}, N={n} needs {kp * np_} packed weight bytes, the file has {got}")


LOADABLE = ("Int8Linear", "Int8Conv2d", "SparseLinear", "SparseInt8Linear", "Im2colConv2d")
_SPARSE_GEMMS = ("SparseLinear", "SparseInt8Linear")


def _gemm_problems(cfg: dict, quantized: bool) -> list[str]:
    problems = []
    if not isinstance(cfg.get("bias"), bool):
        problems.append("bias must be a bool")
    if cfg.get("activation") not in ACTIVATIONS:
        problems.append(f"activation {cfg.get('activation')!r} not in {sorted(ACTIVATIONS)}")
    if not isinstance(cfg.get("name"), (str, type(None))):
        problems.append("name must be a string or null")
    if quantized:
        scale = cfg.get("act_scale")
        if scale is not None and not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
            problems.append(f"act_scale {scale!r} must be null or a finite float > 0")
        if not _is_int(cfg.get("act_zero_point"), 0, 255):
            problems.append(f"act_zero_point {cfg.get('act_zero_point')!r} must be an int in [0, 255]")
        if not _is_int(cfg.get("weight_bits"), 2, 8):
            problems.append(f"weight_bits {cfg.get('weight_bits')!r} must be an int in [2, 8]")
    return problems


def _geometry_problems(cfg: dict) -> list[str]:
    problems = []
    for f in ("kernel_size", "stride", "dilation"):
        if not _pair_ok(cfg.get(f), 1):
            problems.append(f"{f} must be two ints >= 1")
    if not _pair_ok(cfg.get("padding"), 0):
        problems.append("padding must be two ints >= 0")
    if not (_is_int(cfg.get("in_channels"), 1, MAX_K) and _is_int(cfg.get("out_channels"), 1, 1 << 24)):
        problems.append("in_channels / out_channels out of range")
    elif _pair_ok(cfg.get("kernel_size"), 1) and cfg["in_channels"] * cfg["kernel_size"][0] * cfg["kernel_size"][1] > MAX_K:
        problems.append(f"kernel_size x in_channels exceeds K={MAX_K}")
    return problems


def _file_tensor(tensors: dict[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int | None,
                 where: str) -> torch.Tensor:
    """A 1-D tensor of the file, checked before a layer sized from it is allocated."""
    t = tensors.get(key)
    if t is None or t.dtype != dtype or t.dim() != 1 or (numel is not None and t.numel() != numel):
        got = "none" if t is None else f"{t.dtype} {tuple(t.shape)}"
        want = f"1-D {dtype}" + ("" if numel is None else f" of {numel}")
        raise ValueError(f"load: layer {where}: {key} must be {want}, the file has {got}")
    return t


def _build_sparse(kind: str, cfg: dict, k: int, n: int, prefix: str, tensors: dict[str, torch.Tensor],
                  where: str) -> nn.Module:
    """A sparse GEMM module sized from the file's own tensors (never from the manifest alone)."""
    common = {key: cfg[key] for key in ("bias", "activation", "name")}
    if kind == "SparseLinear":
        if cfg.get("format") == "csr":
            _file_tensor(tensors, prefix + "row_ptr", torch.int32, n + 1, where)
            nnz = _file_tensor(tensors, prefix + "col_idx", torch.uint16, None, where).numel()
            return SparseLinear(k, n, nnz=nnz, format="csr", **common)
        if cfg.get("format") == "nm24":
            if k % 4:
                raise ValueError(f"load: layer {where}: nm24 needs in_features % 4 == 0, got {k}")
            values = tensors.get(prefix + "values")
            if values is None or values.numel() != n * (k // 2):
                raise ValueError(f"load: layer {where}: nm24 with K={k}, N={n} needs {n * (k // 2)} values, the "
                                 f"file has {'none' if values is None else values.numel()}")
            return SparseLinear(k, n, format="nm24", **common)
        raise ValueError(f"load: layer {where}: format {cfg.get('format')!r} not in ('csr', 'nm24')")
    _file_tensor(tensors, prefix + "row_ptr", torch.int32, n + 1, where)
    nblocks = _file_tensor(tensors, prefix + "blk_idx", torch.uint16, None, where).numel()
    return SparseInt8Linear(k, n, nblocks=nblocks, act_scale=cfg["act_scale"], act_zero_point=cfg["act_zero_point"],
                            weight_bits=cfg["weight_bits"], **common)


def _build_layer(entry, where: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """An empty pycompress layer from a manifest entry, after checking every field."""
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise ValueError(f"load: manifest entry for {where} is malformed")
    kind, cfg = entry.get("type"), entry["config"]
    if kind not in LOADABLE:
        raise ValueError(f"load: layer {where} has type {kind!r}; this build loads {', '.join(LOADABLE)}")
    if kind == "Im2colConv2d":
        gemm_entry = cfg.get("gemm")
        if not (isinstance(gemm_entry, dict) and gemm_entry.get("type") in _SPARSE_GEMMS
                and isinstance(gemm_entry.get("config"), dict)):
            raise ValueError(f"load: layer {where}: a lowered conv needs a 'gemm' entry of type {_SPARSE_GEMMS}")
        gemm_kind, gemm_cfg = gemm_entry["type"], gemm_entry["config"]
        problems = _geometry_problems(cfg) + _gemm_problems(gemm_cfg, gemm_kind == "SparseInt8Linear")
        if not isinstance(cfg.get("name"), (str, type(None))):
            problems.append("name must be a string or null")
        if problems:
            raise ValueError(f"load: layer {where}: " + "; ".join(problems))
        k = cfg["in_channels"] * cfg["kernel_size"][0] * cfg["kernel_size"][1]
        gemm = _build_sparse(gemm_kind, gemm_cfg, k, cfg["out_channels"], f"{where}.gemm.", tensors, where)
        return Im2colConv2d(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                            tuple(cfg["padding"]), tuple(cfg["dilation"]), gemm=gemm, name=cfg["name"])
    problems = _gemm_problems(cfg, kind != "SparseLinear")
    if kind == "Int8Conv2d":
        problems += _geometry_problems(cfg)
    elif not (_is_int(cfg.get("in_features"), 1, MAX_K) and _is_int(cfg.get("out_features"), 1, 1 << 24)):
        problems.append("in_features / out_features out of range")
    if problems:
        raise ValueError(f"load: layer {where}: " + "; ".join(problems))
    if kind in _SPARSE_GEMMS:
        return _build_sparse(kind, cfg, cfg["in_features"], cfg["out_features"], f"{where}.", tensors, where)
    common = {k: cfg.get(k) for k in ("bias", "activation", "act_scale", "act_zero_point", "weight_bits", "name")}
    if kind == "Int8Linear":
        _check_packed_size(cfg, cfg["in_features"], cfg["out_features"], tensors.get(f"{where}.w_packed"), where)
        return Int8Linear(cfg["in_features"], cfg["out_features"], **common)
    k = cfg["in_channels"] * cfg["kernel_size"][0] * cfg["kernel_size"][1]
    _check_packed_size(cfg, k, cfg["out_channels"], tensors.get(f"{where}.gemm.w_packed"), where)
    return Int8Conv2d(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                      tuple(cfg["padding"]), tuple(cfg["dilation"]), **common)


def _check_int8_operands(gemm: Int8Linear, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
    """The packed operands' invariants; the kernel reads them without further checks."""
    k, n = gemm.in_features, gemm.out_features
    kp, np_ = round_up(k, KGROUP), round_up(n, PANEL)
    packed, col_sum, w_scale = tensors[prefix + "w_packed"], tensors[prefix + "col_sum"], tensors[prefix + "w_scale"]
    qmax = 2 ** (gemm.weight_bits - 1) - 1
    full = packed.view(np_ // PANEL, kp // KGROUP, PANEL, KGROUP).permute(0, 2, 1, 3).reshape(np_, kp)
    if full.numel() and (full.min() < -qmax or full.max() > qmax):
        raise ValueError(f"load: {where}: packed weights leave the symmetric int{gemm.weight_bits} range [-{qmax}, {qmax}]")
    if full[n:].any() or full[:, k:].any():
        raise ValueError(f"load: {where}: packed weights have nonzero padding (corrupt or not from pycompress)")
    if not torch.equal(full.sum(dim=1, dtype=torch.int32), col_sum):
        raise ValueError(f"load: {where}: col_sum does not match the packed weights (corrupt file)")
    if not (torch.isfinite(w_scale).all() and (w_scale > 0).all()):
        raise ValueError(f"load: {where}: w_scale must be finite and > 0")
    _check_finite_bias(tensors, prefix, where)


def _check_finite_bias(tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
    bias = tensors.get(prefix + "bias")
    if bias is not None and not torch.isfinite(bias).all():
        raise ValueError(f"load: {where}: bias has NaN or Inf")


def _check_sparse_operands(gemm: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
    """A sparse pack's invariants. The structure (row_ptr from 0, non-decreasing, ending at the stored
    count, every index < K) is checked by the same C++ validator the ops run, on the file's tensors,
    before anything else reads them; then the values the kernels trust."""
    k, n = gemm.in_features, gemm.out_features
    if isinstance(gemm, SparseLinear):
        values = tensors[prefix + "values"]
        if gemm.format == "csr":
            _validate_structure("sparse_linear_csr", tensors[prefix + "row_ptr"], tensors[prefix + "col_idx"], k,
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
        _check_finite_bias(tensors, prefix, where)
        return
    row_ptr, blk_idx, values = tensors[prefix + "row_ptr"], tensors[prefix + "blk_idx"], tensors[prefix + "values"]
    _validate_structure("sparse_int8_linear", row_ptr, blk_idx, k, _C.sparse_validate_bsr1x4, where)
    qmax = 2 ** (gemm.weight_bits - 1) - 1
    blocks = values.view(-1, 4)
    if blocks.numel() and (blocks.min() < -qmax or blocks.max() > qmax):
        raise ValueError(f"load: {where}: sparse int8 values leave the symmetric int{gemm.weight_bits} range "
                         f"[-{qmax}, {qmax}]")
    if k % 4 and blocks[blk_idx.to(torch.int64) == k // 4, k % 4:].any():
        raise ValueError(f"load: {where}: the last 1x4 block of a row holds nonzeros past K={k} (corrupt file)")
    rows = torch.repeat_interleave(torch.arange(n), row_ptr.diff().to(torch.int64))
    row_sums = torch.zeros(n, dtype=torch.int32).index_add_(0, rows, blocks.sum(dim=1, dtype=torch.int32))
    if not torch.equal(row_sums, tensors[prefix + "col_sum"]):
        raise ValueError(f"load: {where}: col_sum does not match the sparse int8 values (corrupt file)")
    w_scale = tensors[prefix + "w_scale"]
    if not (torch.isfinite(w_scale).all() and (w_scale > 0).all()):
        raise ValueError(f"load: {where}: w_scale must be finite and > 0")
    _check_finite_bias(tensors, prefix, where)


def _validate_structure(op: str, row_ptr: torch.Tensor, idx: torch.Tensor, k: int, validate, where: str) -> None:
    try:
        ensure_valid_structure(op, row_ptr.contiguous(), idx.contiguous(), k, validate)
    except ValueError as exc:
        raise ValueError(f"load: {where}: {exc}") from None


# ---------------------------------------------------------------- manifest: architecture


def _constructor_args(module: nn.Module) -> dict | None:
    args = {}
    for p in list(inspect.signature(type(module).__init__).parameters.values())[1:]:
        if p.name in ("device", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(module, p.name):
            return None
        value = getattr(module, p.name)
        if p.name == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        if isinstance(value, tuple):
            value = list(value)
        if not (isinstance(value, _JSON_SCALARS) or (isinstance(value, list) and all(isinstance(v, _JSON_SCALARS) for v in value))):
            return None
        args[p.name] = value
    return args


def _architecture(module: nn.Module, layer_names: dict[int, str]) -> dict | None:
    """The module tree as JSON, or None when some module is not rebuildable without code."""
    if id(module) in layer_names:
        return {"layer": layer_names[id(module)]}
    name = type(module).__name__
    if REBUILDABLE.get(name) is not type(module):
        return None
    spec = {"type": name, "children": {}}
    if not isinstance(module, (nn.Sequential, nn.ModuleList)):
        args = _constructor_args(module)
        if args is None:
            return None
        spec["args"] = args
    for child_name, child in module._modules.items():  # named_children() would drop a repeated (shared) child
        if child is None:
            return None
        child_spec = _architecture(child, layer_names)
        if child_spec is None:
            return None
        spec["children"][child_name] = child_spec
    return spec


def _rebuild(spec, layers: dict[str, nn.Module], where: str = "model") -> nn.Module:
    if not isinstance(spec, dict):
        raise ValueError(f"load: architecture entry {where} is malformed")
    if "layer" in spec:
        if spec["layer"] not in layers:
            raise ValueError(f"load: architecture refers to unknown layer {spec['layer']!r}")
        return layers[spec["layer"]]
    cls = REBUILDABLE.get(spec.get("type"))
    children = spec.get("children")
    if cls is None or not isinstance(children, dict):
        raise ValueError(f"load: architecture entry {where} has type {spec.get('type')!r}, not one of {sorted(REBUILDABLE)}")
    built = {name: _rebuild(child, layers, f"{where}.{name}") for name, child in children.items()}
    if cls in (nn.Sequential, nn.ModuleList):
        module = cls()
        for name, child in built.items():
            module.add_module(name, child)
        return module
    args = spec.get("args")
    if not isinstance(args, dict):
        raise ValueError(f"load: architecture entry {where} has no constructor arguments")
    try:
        module = cls(**args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load: cannot build {where} as {cls.__name__}({args}): {exc}") from None
    for name, child in built.items():
        module.add_module(name, child)
    return module


# ---------------------------------------------------------------- entropy coding


def layer_gemm(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the GEMM module, its state_dict prefix) of a converted layer."""
    return (module.gemm, f"{name}.gemm.") if isinstance(module, Im2colConv2d) else (module, f"{name}.")


def entropy_coded_keys(model: nn.Module) -> set[str]:
    """The state_dict keys ``save(..., entropy_coding=True)`` Huffman-codes (``ENTROPY_CODED_BUFFERS``)."""
    keys = set()
    for name, module in converted_layers(model):
        gemm, prefix = layer_gemm(module, name)
        for buffer in ENTROPY_CODED_BUFFERS.get(type(gemm), ()):
            if gemm._buffers.get(buffer) is not None:
                keys.add(prefix + buffer)
    return keys


def huffman_code_if_smaller(t: torch.Tensor) -> HuffmanCoded | None:
    """The tensor's bytes Huffman-coded, or None when that would not be smaller (the 256 code lengths
    cost more than they save on small or near-uniform tensors)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() == 0:
        return None
    coded = huffman_encode(raw)
    return coded if coded.nbytes < raw.numel() else None


def _decode_entropy(manifest: dict, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Replaces every coded tensor by its decoded bytes in the original dtype and shape (in place)."""
    entries = manifest.get("entropy", {})
    if not isinstance(entries, dict):
        raise ValueError(f"load({path}): manifest field 'entropy' is malformed")
    for key, entry in entries.items():
        where = f"load({path}): entropy-coded tensor {key}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: malformed manifest entry")
        dtype, shape, count = _CODED_DTYPES.get(entry.get("dtype")), entry.get("shape"), entry.get("count")
        if dtype is None:
            raise ValueError(f"{where}: dtype {entry.get('dtype')!r} not in {sorted(_CODED_DTYPES)}")
        if not (isinstance(shape, list) and all(_is_int(d, 0, 1 << 40) for d in shape) and _is_int(count, 0, 1 << 50)
                and math.prod(shape) * dtype.itemsize == count):
            raise ValueError(f"{where}: shape {shape!r} of {entry.get('dtype')} does not hold count={count!r} bytes")
        payload, lengths = tensors.get(key), tensors.pop(key + HUFFMAN_LENGTHS_SUFFIX, None)
        if payload is None or lengths is None:
            raise ValueError(f"{where}: the file lacks its payload or its code lengths")
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError(f"{where}: payload must be 1-D uint8, got {payload.dtype} {tuple(payload.shape)}")
        if count > 8 * payload.numel():  # every symbol takes at least one bit: bounds the allocation below
            raise ValueError(f"{where}: {count} symbols cannot fit in {payload.numel()} payload bytes")
        try:
            data = huffman_decode(HuffmanCoded(lengths=lengths, payload=payload, count=count, dtype=torch.uint8))
        except ValueError as exc:
            raise ValueError(f"{where}: corrupt: {exc}") from None
        tensors[key] = data.view(dtype).view(shape)


# ---------------------------------------------------------------- format versions and checksums


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a contiguous CPU tensor's bytes, as safetensors stores them on a little-endian
    host (every CPU pycompress builds for). Hashed through a uint8 numpy view: no copy, so a 100 MB
    model costs one pass of sha256 over its bytes."""
    if not t.is_contiguous():
        raise ValueError(f"tensor_sha256: expected a contiguous tensor, got strides {t.stride()}")
    return hashlib.sha256(t.detach().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def file_metadata(manifest: dict, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors metadata ``save`` writes for ``tensors`` (the file's tensors, as stored):
    ``manifest`` with every tensor's checksum, and the manifest's own checksum."""
    manifest = {**manifest, "checksums": {key: tensor_sha256(t) for key, t in sorted(tensors.items())}}
    text = json.dumps(manifest)
    return {MANIFEST_KEY: text, MANIFEST_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}


def _check_version(manifest, path: str) -> None:
    version = manifest.get("version") if isinstance(manifest, dict) else None
    oldest, newest = min(FORMAT_VERSIONS), max(FORMAT_VERSIONS)
    this = f"this pycompress ({build_info()['version']}) reads versions {oldest}-{newest}"
    if _is_int(version, newest + 1, 1 << 62):
        raise ValueError(f"load({path}): file format version {version}, {this}; upgrade pycompress")
    if not _is_int(version, oldest, newest):
        raise ValueError(f"load({path}): manifest version {version!r} is not a format version; {this}")


def _owner(key: str, layer_names) -> str:
    """Which layer (or other module) a state_dict key of the file belongs to, for error messages."""
    layer = max((n for n in layer_names if isinstance(n, str) and key.startswith(n + ".")), key=len, default=None)
    if layer is not None:
        return f"layer {layer}"
    module = key.rpartition(".")[0]
    return f"module {module}" if module else "the model"


def _verify_manifest_checksum(manifest: dict, metadata: dict, path: str) -> None:
    """The manifest's JSON text against the checksum ``save`` wrote beside it (required from
    ``CHECKSUMS_SINCE``), before any field of it is used."""
    digest = metadata.get(MANIFEST_DIGEST_KEY)
    if digest is None:
        if manifest["version"] >= CHECKSUMS_SINCE:
            raise ValueError(f"load({path}): format version {manifest['version']} needs the manifest checksum "
                             f"(metadata {MANIFEST_DIGEST_KEY!r}); the file has none (corrupt file)")
        return
    got = hashlib.sha256(metadata[MANIFEST_KEY].encode()).hexdigest()
    if got != digest:
        raise ValueError(f"load({path}): the manifest fails its checksum: sha256 {got}, the file says {digest!r} "
                         "(corrupt file)")


def _verify_tensor_checksums(manifest: dict, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Every stored tensor's bytes against the manifest's ``checksums`` (required from ``CHECKSUMS_SINCE``),
    before anything reads them."""
    checksums = manifest.get("checksums")
    if checksums is None and manifest["version"] < CHECKSUMS_SINCE:
        return
    if not (isinstance(checksums, dict) and all(isinstance(v, str) for v in checksums.values())):
        raise ValueError(f"load({path}): manifest field 'checksums' is missing or malformed (format version "
                         f"{manifest['version']} stores one sha256 per tensor)")
    unchecked, unknown = sorted(set(tensors) - set(checksums)), sorted(set(checksums) - set(tensors))
    if unchecked or unknown:
        raise ValueError(f"load({path}): the checksums do not list the file's tensors: tensors without a "
                         f"checksum {unchecked[:5]}, checksums of no tensor {unknown[:5]} (corrupt file)")
    bad = [key for key in sorted(tensors) if tensor_sha256(tensors[key]) != checksums[key]]
    if bad:
        more = f" (and {len(bad) - 1} more: {bad[1:6]})" if len(bad) > 1 else ""
        t = tensors[bad[0]]
        raise ValueError(f"load({path}): tensor {bad[0]} of {_owner(bad[0], manifest['layers'])} "
                         f"({str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}) fails its sha256 checksum: its "
                         f"bytes are not the bytes save wrote (corrupt file){more}")


# ---------------------------------------------------------------- save / load


def save(model: nn.Module, path: str | os.PathLike, *, entropy_coding: bool = False) -> None:
    """Write ``model`` (converted or not) to ``path`` as safetensors + JSON manifest, atomically.

    ``entropy_coding``: store the integer weights and sparse indices Huffman-coded (Deep Compression's
    storage, ``ENTROPY_CODED_BUFFERS``; a tensor is coded only where that makes it smaller). ``load``
    decodes them; the model in memory is the same either way.
    """
    import safetensors.torch

    model = getattr(model, "_orig_mod", model)
    layers = converted_layers(model)
    layer_names: dict[int, str] = {}
    manifest_layers = {}
    for name, module in layers:
        if id(module) not in layer_names:
            layer_names[id(module)] = name
            manifest_layers[name] = {"type": type(module).__name__, "config": _layer_config(module)}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        if not isinstance(tensor, torch.Tensor):
            continue  # a module's extra state (Int8Linear's config): the manifest carries and checks it
        if tensor.device.type != "cpu":
            raise ValueError(f"save: {key} is on {tensor.device}; move the model to CPU first")
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if ident in by_storage and tensor.numel():
            aliases[key] = by_storage[ident]
            continue
        by_storage[ident] = key
        tensors[key] = tensor.detach().contiguous().clone()
    entropy = {}
    if entropy_coding:
        for key in sorted(entropy_coded_keys(model) & tensors.keys()):
            original = tensors[key]
            coded = huffman_code_if_smaller(original)
            if coded is None:
                continue
            tensors[key] = coded.payload
            tensors[key + HUFFMAN_LENGTHS_SUFFIX] = coded.lengths
            entropy[key] = {"dtype": str(original.dtype).removeprefix("torch."), "shape": list(original.shape),
                            "count": coded.count}
    record = conversion_record(model)
    manifest = {
        "version": MANIFEST_VERSION,
        "pycompress": build_info()["version"],
        "layers": manifest_layers,
        "architecture": _architecture(model, layer_names),
        "aliases": aliases,
        "fused": list(record.fused) if record is not None else [],
        "record": asdict(record) if record is not None else None,
        "entropy": entropy,
    }
    metadata = file_metadata(manifest, tensors)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".pycompress-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    import safetensors
    from safetensors import SafetensorError

    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"load({path}): not a valid safetensors file: {exc}") from None
    if MANIFEST_KEY not in metadata:
        raise ValueError(f"load({path}): no pycompress manifest (was it written by pycompress.save?)")
    try:
        manifest = json.loads(metadata[MANIFEST_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"load({path}): the manifest is not valid JSON: {exc}") from None
    _check_version(manifest, path)
    _verify_manifest_checksum(manifest, metadata, path)
    for field in ("layers", "aliases"):
        if not isinstance(manifest.get(field), dict):
            raise ValueError(f"load({path}): manifest field {field!r} is missing or malformed")
    _verify_tensor_checksums(manifest, tensors, path)
    _decode_entropy(manifest, tensors, path)
    return manifest, tensors


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _record_from(manifest: dict) -> ConversionRecord | None:
    rec = manifest.get("record")
    if not isinstance(rec, dict):
        return None
    try:
        layers = [LayerRecord(**{**r, "input_shape": None}) for r in rec["layers"]]
        shared = [{"layers": [str(n) for n in g["layers"]], "adjacent": bool(g["adjacent"])}
                  for g in rec.get("shared_input", [])]
        return ConversionRecord(str(rec["policy"]), layers, [str(n) for n in rec["notes"]],
                                [str(n) for n in rec.get("fused", [])], shared,
                                [str(n) for n in rec.get("attention", [])])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"load: the manifest's conversion record is malformed: {exc}") from None


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a model written by ``save``.

    ``model=None`` rebuilds Sequential-style models from the manifest. For any other architecture,
    pass a freshly built float model of the same architecture (random weights are fine): its layers
    are replaced following the manifest and every tensor comes from the file.
    """
    path = os.fspath(path)
    manifest, tensors = _read(path)
    layers = {name: _build_layer(entry, name, tensors) for name, entry in manifest["layers"].items()}
    rebuilt = model is None
    if rebuilt:
        if manifest.get("architecture") is None:
            raise ValueError(f"load({path}): this model's architecture is not made only of plain torch.nn modules, so it "
                             "cannot be rebuilt without code; pass model=<a float instance of the same architecture>")
        # Built on the meta device: sizes in the manifest allocate nothing until they match the file's tensors.
        with torch.device("meta"):
            model = _rebuild(manifest["architecture"], layers)
    else:
        for name, layer in layers.items():
            try:
                float_layer = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"load({path}): the model has no layer {name} (is it the same architecture?)") from None
            kind = _target_kind(float_layer)
            expected = "Conv2d" if isinstance(layer, Im2colConv2d) else "Linear"
            if kind != expected:
                raise ValueError(f"load({path}): layer {name} is a {type(float_layer).__name__}, the file has a "
                                 f"converted {expected}")
            shape_ok = ((float_layer.in_features, float_layer.out_features) == (layer.in_features, layer.out_features)
                        if kind == "Linear" else
                        (float_layer.in_channels, float_layer.out_channels, tuple(float_layer.kernel_size))
                        == (layer.in_channels, layer.out_channels, layer.kernel_size))
            if not shape_ok:
                raise ValueError(f"load({path}): layer {name}: the model's {float_layer} does not match the file's {layer}")
        fused = manifest.get("fused", [])
        if not isinstance(fused, list):
            raise ValueError(f"load({path}): manifest field 'fused' is malformed")
        for act_path in fused:
            act = model.get_submodule(act_path) if isinstance(act_path, str) and _has_submodule(model, act_path) else None
            if act is None or fusible_activation(act) is None:
                raise ValueError(f"load({path}): the file fused the activation {act_path!r} into its layer, but the "
                                 "model has no such ReLU / GELU there (is it the same architecture?)")
            parent_name, _, child = act_path.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
        # Shared layers: every path that holds the same float layer gets the one converted layer.
        by_float = {id(model.get_submodule(name)): layer for name, layer in layers.items()}
        paths = [(q, by_float[id(m)]) for q, m in model.named_modules(remove_duplicate=False) if q and id(m) in by_float]
        for qualified, layer in paths:
            parent_name, _, child = qualified.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)

    for key, target in manifest["aliases"].items():
        if not isinstance(target, str) or target not in tensors:
            raise ValueError(f"load({path}): alias {key!r} -> {target!r} names no stored tensor")
        tensors[key] = tensors[target]
    expected = model.state_dict()
    for key, value in expected.items():
        if not isinstance(value, torch.Tensor):
            tensors[key] = value  # extra state of a layer built from the checked manifest config
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"load({path}): tensors do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, want in expected.items():
        got = tensors[key]
        if not isinstance(want, torch.Tensor):
            continue
        if got.dtype != want.dtype or got.shape != want.shape:
            raise ValueError(f"load({path}): {key} is {got.dtype} {tuple(got.shape)}, expected {want.dtype} "
                             f"{tuple(want.shape)}")
    for name, module in converted_layers(model):
        gemm, prefix = layer_gemm(module, name)
        if isinstance(gemm, Int8Linear):
            _check_int8_operands(gemm, tensors, prefix, name)
        else:
            _check_sparse_operands(gemm, tensors, prefix, name)
    model.load_state_dict(tensors, strict=True, assign=rebuilt)
    record = _record_from(manifest)
    if record is not None:
        model._pycompress_conversion = record
        try:
            restore_shared_inputs(model, record.shared_input)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"load({path}): a shared-input group of the conversion record does not fit the "
                             f"model: {exc}") from None
        if record.attention:
            switched = use_fused_attention(model)
            if sorted(switched) != sorted(record.attention):
                record.notes.append(f"load: the file's model ran fused attention in {len(record.attention)} "
                                    f"modules; this one in {len(switched)}")
    return model

