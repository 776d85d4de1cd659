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
  stored Huffman-coded (``pycompress.entropy``): ``{key: {dtype, shape, count[, lengths]}}``; the file
  holds the payload under ``key`` and the code lengths under ``key + "/huffman_lengths"``: all 256, or
  (``"lengths": "pairs"``, version 3) (symbol, length) byte pairs of the symbols present;
- ``zero_runs`` (version 3): the layers whose integer weight matrix is stored as zero runs and nonzeros
  (``code_layer``): ``{prefix: {layer, module, shape, sha256}}``; the two streams are entropy-coded
  tensors ``prefix + "integer_weight/zero_runs"`` and ``prefix + "integer_weight/nonzeros"``; ``load``
  decodes them, packs the module's ``INTEGER_DERIVED`` buffers from the matrix and checks them against
  ``sha256`` before the validators below see them.

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

Memory-mapped loads (``load(path, mmap=True)``): the model's tensors stay views of the file, mapped
copy-on-write (``MAP_PRIVATE``), so the pages are the page cache's and several processes that load one
file share one copy of the weights (a server's worker processes). The checks above run on the mapped
bytes, so the file must not be changed in place while it is mapped: ``save`` replaces a file by renaming
a new one over it, which leaves a mapping on the old file intact, but a write into the file (or its
truncation, which makes reading a page a SIGBUS) would reach the loaded model unchecked. Writes to the
loaded tensors copy the page and never reach the file. Entropy-coded tensors are decoded into memory.
Without ``mmap`` every tensor is copied out of the file before anything reads it.

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

from pycompress._native import build_info
from pycompress.conversion import ConversionRecord, LayerRecord, apply_plan, conversion_record
from pycompress.entropy import (
    HuffmanCoded,
    huffman_decode,
    huffman_encode,
    lengths_from_stored,
    stored_lengths,
    zero_run_bytes,
    zero_run_decode,
)
from pycompress.nn.checks import is_int
from pycompress.nn.registry import LAYER_TYPES, compressed_layers, float_kind, linearize_transposed
from pycompress.prune import masks

MANIFEST_KEY = "pycompress"
MANIFEST_DIGEST_KEY = "pycompress_sha256"  # metadata key: sha256 of the manifest's JSON text (version >= 2)
# Every manifest format version this pycompress reads, and what it added. save writes the newest; load
# reads them all (tests/data/golden/v<N>/ holds files of version N). Add a version when a file written
# now would be misread by an older load, never change what an old version means.
FORMAT_VERSIONS = {
    1: "the manifest (layers, architecture, aliases, fused, record, entropy) and the tensors",
    2: "checksums: the sha256 of every stored tensor's bytes in the manifest, and of the manifest itself",
    3: "zero-run coding: a layer's integer weights stored as zero runs and nonzeros (manifest 'zero_runs'), its "
       "kernel buffers rebuilt on load and checked against their sha256; code lengths as (symbol, length) pairs",
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

# What entropy_coding stores Huffman-coded is each layer class's ENTROPY_CODED (pycompress.nn.registry):
# the integer weights and the sparse index arrays (as bytes), whose byte histograms are far from uniform
# after pruning and quantization. fp32 values, scales and biases are left as they are (close to uniform).
HUFFMAN_LENGTHS_SUFFIX = "/huffman_lengths"
# A zero-run-coded integer weight matrix (format version 3): its two Huffman-coded streams, under the prefix
# of the module whose buffers they replace (``code_layer``).
ZERO_RUNS_SUFFIX = "integer_weight/zero_runs"
NONZEROS_SUFFIX = "integer_weight/nonzeros"
_CODED_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.int8, torch.uint8, torch.uint16, torch.int32,
                                                            torch.uint32)}


# ---------------------------------------------------------------- manifest: pycompress layers


def _build_layer(entry, where: str, tensors: dict[str, torch.Tensor], path: str = "") -> nn.Module:
    """An empty pycompress layer from a manifest entry, after its class checked every field."""
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise ValueError(f"load({path}): manifest entry for layer {where} is malformed")
    kind = entry.get("type")
    if not isinstance(kind, str) or kind not in LAYER_TYPES:
        raise ValueError(f"load: layer {where} has type {kind!r}; this build loads {', '.join(LAYER_TYPES)}")
    return LAYER_TYPES[kind].from_config(entry["config"], tensors, f"{where}.", where)


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


def _json_kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number" if isinstance(v, float) else "int"
    if isinstance(v, (list, tuple)):
        return "list"
    return type(v).__name__


def _args_problem(cls: type[nn.Module], args: dict) -> str | None:
    """What is wrong with a rebuildable module's constructor arguments from a manifest, judged against the
    constructor's defaults (``_constructor_args`` writes the attributes, which have the defaults' types):
    a bool where a bool is, an int where an int is (a float where a float is may be an int), ints (or a list of
    ints) for the arguments without a default, which are all sizes. None when nothing."""
    params = {p.name: p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]}
    for name, value in args.items():
        p = params.get(name)
        if p is None or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name in ("device", "dtype"):
            return f"unexpected argument {name!r}"
        default = p.default
        got = _json_kind(value)
        if default is inspect.Parameter.empty:
            ints = value if isinstance(value, list) else [value]
            if not ints or not all(_json_kind(v) == "int" and 0 <= v <= 1 << 40 for v in ints):
                return f"{name}={value!r} must be an int in [0, 2**40] or a list of them"
        elif default is not None:
            want = _json_kind(default)
            if not (got == want or (want == "number" and got == "int") or (want == "int" and got == "list"
                                                                            and all(_json_kind(v) == "int" for v in value))):
                return f"{name}={value!r} is a {got}, the constructor's default {default!r} a {want}"
    return None


def _rebuild(spec, layers: dict[str, nn.Module], path: str, where: str = "model") -> nn.Module:
    if not isinstance(spec, dict):
        raise ValueError(f"load({path}): architecture entry {where} is malformed")
    if "layer" in spec:
        if not isinstance(spec["layer"], str) or spec["layer"] not in layers:
            raise ValueError(f"load({path}): architecture entry {where} refers to unknown layer {spec['layer']!r}")
        return layers[spec["layer"]]
    kind = spec.get("type")
    cls = REBUILDABLE.get(kind) if isinstance(kind, str) else None
    children = spec.get("children")
    if cls is None or not isinstance(children, dict):
        raise ValueError(f"load({path}): architecture entry {where} has type {kind!r} and children "
                         f"{type(children).__name__}: needs a dict of children and a type in {sorted(REBUILDABLE)}")
    for name in children:
        if not name or "." in name:  # what add_module refuses (with a KeyError)
            raise ValueError(f"load({path}): architecture entry {where} has a child named {name!r}")
    built = {name: _rebuild(child, layers, path, f"{where}.{name}") for name, child in children.items()}
    if cls in (nn.Sequential, nn.ModuleList):
        module = cls()
        for name, child in built.items():
            module.add_module(name, child)
        return module
    args = spec.get("args")
    if not isinstance(args, dict):
        raise ValueError(f"load({path}): architecture entry {where} has no constructor arguments")
    problem = _args_problem(cls, args)
    if problem:
        raise ValueError(f"load({path}): cannot build {where} as {cls.__name__}({args}): {problem}")
    try:
        module = cls(**args)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"load({path}): cannot build {where} as {cls.__name__}({args}): {exc}") from None
    for name, child in built.items():
        module.add_module(name, child)
    return module


# ---------------------------------------------------------------- entropy coding


def entropy_coded_keys(model: nn.Module) -> set[str]:
    """The state_dict keys ``save(..., entropy_coding=True)`` Huffman-codes (each layer's ``ENTROPY_CODED``)."""
    return {f"{name}.{key}" for name, module in compressed_layers(model) for key in module.entropy_coded_keys()}


def huffman_code_if_smaller(t: torch.Tensor) -> HuffmanCoded | None:
    """The tensor's bytes Huffman-coded, or None when that would not be smaller (the code lengths cost
    more than they save on small or near-uniform tensors)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() == 0:
        return None
    coded = huffman_encode(raw)
    return coded if coded.nbytes < raw.numel() else None


def _entropy_entry(original: torch.Tensor, coded: HuffmanCoded, key: str, stored: dict[str, torch.Tensor]) -> dict:
    """Puts ``coded`` in ``stored`` (payload under ``key``, code lengths beside it) and returns its manifest entry."""
    lengths, pairs = stored_lengths(coded.lengths)
    stored[key], stored[key + HUFFMAN_LENGTHS_SUFFIX] = coded.payload, lengths
    entry = {"dtype": str(original.dtype).removeprefix("torch."), "shape": list(original.shape), "count": coded.count}
    if pairs:
        entry["lengths"] = "pairs"
    return entry


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def code_layer(name: str, layer: nn.Module, tensors: dict[str, torch.Tensor],
               pinned: frozenset[str] = frozenset()) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """What ``save(..., entropy_coding=True)`` stores for one compressed layer: (its stored tensors, their
    ``entropy`` entries, its ``zero_runs`` entries). ``tensors``: the layer's state (``name.`` keys) as stored
    without coding; ``pinned``: keys other keys alias, which must stay stored as they are.

    For each module of the layer with ``INTEGER_DERIVED`` buffers (``integer_weight_modules``): when those
    buffers are exactly what packing its integer weight matrix gives, and the matrix coded as zero runs and
    nonzeros (``pycompress.entropy.ZeroRunCoded``: Deep Compression's storage, whose size follows the nonzeros
    whatever layout the kernel unpacks them to) is smaller than the buffers coded one by one, the file holds
    the two streams instead and ``load`` rebuilds the buffers. Every other ``ENTROPY_CODED`` buffer is
    Huffman-coded where that is smaller. ``compression_report`` sizes the same result."""
    stored = dict(tensors)
    entropy, zero_runs = {}, {}
    coded_keys = {f"{name}.{key}" for key in layer.entropy_coded_keys()}

    def one_by_one(keys) -> tuple[dict, dict]:
        out, entries = {}, {}
        for key in keys:
            coded = huffman_code_if_smaller(tensors[key]) if key in coded_keys else None
            if coded is None:
                out[key] = tensors[key]
            else:
                entries[key] = _entropy_entry(tensors[key], coded, key, out)
        return out, entries

    for rel, module in layer.integer_weight_modules():
        prefix = f"{name}.{rel}"
        derived = [prefix + b for b in module.INTEGER_DERIVED]
        if any(key in pinned or key not in tensors for key in derived):
            continue
        q = module.integer_weight()
        where = f"save: layer {name}"
        rebuilt = type(module).derive_from_integer_weight(q, module.config(), tensors, prefix, where)
        if not all(torch.equal(rebuilt[b].reshape(-1).view(torch.uint8), tensors[prefix + b].reshape(-1).view(torch.uint8))
                   for b in module.INTEGER_DERIVED):
            continue  # a pack built some other way (older code, a hand-made layer): stored as it is
        runs, values = zero_run_bytes(q)
        as_runs, run_entries = {}, {}
        for key, t in ((prefix + ZERO_RUNS_SUFFIX, runs), (prefix + NONZEROS_SUFFIX, values)):
            run_entries[key] = _entropy_entry(t, huffman_encode(t), key, as_runs)
        as_buffers, buffer_entries = one_by_one(derived)
        if _bytes(as_runs) >= _bytes(as_buffers):
            continue
        for key in derived:
            del stored[key]
        stored.update(as_runs)
        entropy.update(run_entries)
        zero_runs[prefix] = {"layer": name, "module": rel.rstrip("."), "shape": list(q.shape),
                             "sha256": _derived_sha256(rebuilt, module.INTEGER_DERIVED)}
    rest = [key for key in coded_keys if key in stored and key in tensors and key not in pinned]
    out, entries = one_by_one(rest)
    stored.update(out)
    entropy.update(entries)
    return stored, entropy, zero_runs


def _derived_sha256(buffers: dict[str, torch.Tensor], names: tuple[str, ...]) -> str:
    """One sha256 over the bytes of ``names``' buffers, in that order: what a zero-run entry records of the
    buffers its weights rebuild."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(buffers[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _decode_entropy(manifest: dict, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Replaces every coded tensor by its decoded bytes in the original dtype and shape (in place)."""
    entries = manifest.get("entropy", {})
    if not isinstance(entries, dict):
        raise ValueError(f"load({path}): manifest field 'entropy' is malformed")
    for key, entry in entries.items():
        where = f"load({path}): entropy-coded tensor {key}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: malformed manifest entry")
        name = entry.get("dtype")
        dtype = _CODED_DTYPES.get(name) if isinstance(name, str) else None
        shape, count = entry.get("shape"), entry.get("count")
        if dtype is None:
            raise ValueError(f"{where}: dtype {entry.get('dtype')!r} not in {sorted(_CODED_DTYPES)}")
        if not (isinstance(shape, list) and all(is_int(d, 0, 1 << 40) for d in shape) and is_int(count, 0, 1 << 50)
                and math.prod(shape) * dtype.itemsize == count):
            raise ValueError(f"{where}: shape {shape!r} of {entry.get('dtype')} does not hold count={count!r} bytes")
        form = entry.get("lengths", "all")
        if form not in ("all", "pairs") or (form == "pairs" and manifest["version"] < 3):
            raise ValueError(f"{where}: code lengths form {form!r} is not one this format version stores")
        payload, lengths = tensors.get(key), tensors.pop(key + HUFFMAN_LENGTHS_SUFFIX, None)
        if payload is None or lengths is None:
            raise ValueError(f"{where}: the file lacks its payload or its code lengths")
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError(f"{where}: payload must be 1-D uint8, got {payload.dtype} {tuple(payload.shape)}")
        if count > 8 * payload.numel():  # every symbol takes at least one bit: bounds the allocation below
            raise ValueError(f"{where}: {count} symbols cannot fit in {payload.numel()} payload bytes")
        try:
            lengths = lengths_from_stored(lengths, form == "pairs")
            data = huffman_decode(HuffmanCoded(lengths=lengths, payload=payload, count=count, dtype=torch.uint8))
        except ValueError as exc:
            raise ValueError(f"{where}: corrupt: {exc}") from None
        tensors[key] = data.view(dtype).view(shape)


def _module_entry(manifest: dict, layer: str, module: str) -> dict | None:
    """The manifest entry ({type, config}) of ``module`` (a dotted path; "" the layer itself) inside ``layer``."""
    entry = manifest["layers"].get(layer)
    for part in module.split(".") if module else []:
        entry = entry.get("config", {}).get(part) if isinstance(entry, dict) and isinstance(entry.get("config"), dict) else None
    return entry if isinstance(entry, dict) and isinstance(entry.get("config"), dict) else None


def _rebuild_zero_runs(manifest: dict, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Replaces each zero-run-coded integer weight matrix (manifest ``zero_runs``, decoded by
    ``_decode_entropy``) by the kernel buffers its layer packs from it, each checked against the sha256 save
    recorded, so what reaches the validators is what was saved, bit for bit (in place)."""
    entries = manifest.get("zero_runs", {})
    if not isinstance(entries, dict):
        raise ValueError(f"load({path}): manifest field 'zero_runs' is malformed")
    for prefix, entry in entries.items():
        where = f"load({path}): zero-run-coded weights {prefix!r}"
        if not (isinstance(entry, dict) and isinstance(entry.get("layer"), str) and isinstance(entry.get("module"), str)
                and isinstance(entry.get("sha256"), str) and isinstance(entry.get("shape"), list)
                and len(entry["shape"]) == 2 and all(is_int(d, 1, 1 << 31) for d in entry["shape"])):
            raise ValueError(f"{where}: malformed manifest entry")
        layer, module = entry["layer"], entry["module"]
        if prefix != f"{layer}.{module + '.' if module else ''}":
            raise ValueError(f"{where}: the key does not name layer {layer!r} module {module!r}")
        spec = _module_entry(manifest, layer, module)
        cls = LAYER_TYPES.get(spec.get("type")) if spec is not None else None
        if cls is None or not cls.INTEGER_DERIVED:
            raise ValueError(f"{where}: layer {layer} has no module {module!r} whose buffers are rebuilt from "
                             "integer weights")
        runs, values = tensors.pop(prefix + ZERO_RUNS_SUFFIX, None), tensors.pop(prefix + NONZEROS_SUFFIX, None)
        if runs is None or values is None or any(prefix + b in tensors for b in cls.INTEGER_DERIVED):
            raise ValueError(f"{where}: the file must hold its zero runs and nonzeros and none of "
                             f"{list(cls.INTEGER_DERIVED)}")
        try:
            q = zero_run_decode(runs, values, tuple(entry["shape"]))
        except ValueError as exc:
            raise ValueError(f"{where}: corrupt: {exc}") from None
        rebuilt = cls.derive_from_integer_weight(q, spec["config"], tensors, prefix, f"layer {layer}")
        if _derived_sha256(rebuilt, cls.INTEGER_DERIVED) != entry["sha256"]:
            raise ValueError(f"{where}: the rebuilt {', '.join(cls.INTEGER_DERIVED)} fail their sha256 checksum: the "
                             "weights are not the ones save wrote (corrupt file)")
        tensors.update({prefix + buf: rebuilt[buf].contiguous() for buf in cls.INTEGER_DERIVED})


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
    if is_int(version, newest + 1, 1 << 62):
        raise ValueError(f"load({path}): file format version {version}, {this}; upgrade pycompress")
    if not is_int(version, oldest, newest):
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

    ``entropy_coding``: Deep Compression's storage (``code_layer``): integer weight matrices as Huffman-coded
    zero runs and nonzeros, other integer and index buffers (each layer's ``ENTROPY_CODED``) Huffman-coded,
    each only where that makes it smaller. ``load`` decodes them; the model in memory is the same either way.
    """
    import safetensors.torch

    model = getattr(model, "_orig_mod", model)
    for name, module in model.named_modules():
        if state := masks.training_state(module):
            raise ValueError(
                f"save: layer {name or '(the model)'} ({type(module).__name__}) still carries pycompress's "
                f"training-time {' and '.join(state)}, which load cannot rebuild. Convert the model first "
                "(pc.convert), or bake it into a float model: pycompress.quant.remove_fake_quant(layer) for fake "
                "quantization, then pycompress.prune.remove(model) for masks")
    layers = compressed_layers(model)
    layer_names: dict[int, str] = {}
    manifest_layers = {}
    for name, module in layers:
        if id(module) not in layer_names:
            layer_names[id(module)] = name
            manifest_layers[name] = {"type": type(module).__name__, "config": module.config()}
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
    entropy, zero_runs = {}, {}
    if entropy_coding:
        pinned = frozenset(aliases.values())
        for name, module in layers:
            if layer_names[id(module)] != name:
                continue  # a shared layer: stored under its first name
            own = {k: t for k, t in tensors.items() if k.startswith(name + ".")}
            stored, coded, runs = code_layer(name, module, own, pinned)
            for key in own:
                del tensors[key]
            tensors.update(stored)
            entropy.update(coded)
            zero_runs.update(runs)
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
        "zero_runs": zero_runs,
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


def _read(path: str, mmap: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    import safetensors
    from safetensors import SafetensorError

    try:
        # safe_open's tensors are views of a copy-on-write mapping of the file (safetensors >= 0.4).
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"load({path}): not a valid safetensors file: {exc}") from None
    if not mmap:
        # Own copies before the checksums read them: what is checked is what the kernels read, whatever
        # happens to the file afterwards.
        tensors = {k: t.clone() for k, t in tensors.items()}
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
    if "zero_runs" in manifest and manifest["version"] < 3:
        raise ValueError(f"load({path}): format version {manifest['version']} has no field 'zero_runs' (corrupt file)")
    _verify_tensor_checksums(manifest, tensors, path)
    _decode_entropy(manifest, tensors, path)
    _rebuild_zero_runs(manifest, tensors, path)
    return manifest, tensors


def _record_from(manifest: dict, path: str) -> ConversionRecord | None:
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
        raise ValueError(f"load({path}): the manifest's conversion record is malformed: {exc}") from None


def load(path: str | os.PathLike, model: nn.Module | None = None, *, mmap: bool = False) -> nn.Module:
    """Load a model written by ``save``.

    ``model=None`` rebuilds Sequential-style models from the manifest. For any other architecture,
    pass a freshly built float model of the same architecture (random weights are fine): its layers
    are replaced following the manifest and every tensor comes from the file.

    ``mmap=True``: the model's tensors stay views of the memory-mapped file instead of copies (processes
    that load the same file share its pages); the same checks run first. ``model``'s own tensors are
    then replaced, not written into. The file must not be modified in place while the model is in use
    (the module docstring says why; ``save`` never does).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"load({path}): a directory; pass the .safetensors file pycompress.save wrote")
    manifest, tensors = _read(path, mmap)
    layers = {name: _build_layer(entry, name, tensors, path) for name, entry in manifest["layers"].items()}
    rebuilt = model is None
    if rebuilt:
        if manifest.get("architecture") is None:
            raise ValueError(f"load({path}): this model's architecture is not made only of plain torch.nn modules, so it "
                             "cannot be rebuilt without code; pass model=<a float instance of the same architecture>")
        # Built on the meta device: sizes in the manifest allocate nothing until they match the file's tensors.
        with torch.device("meta"):
            model = _rebuild(manifest["architecture"], layers, path)
    else:
        linearize_transposed(model)  # as convert did: a Conv1D's saved weight is a Linear's [out, in]
        for name, layer in layers.items():
            try:
                float_layer = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"load({path}): the model has no layer {name} (is it the same architecture?)") from None
            if float_kind(float_layer) != layer.FLOAT_KIND:
                raise ValueError(f"load({path}): layer {name} is a {type(float_layer).__name__}, the file has a "
                                 f"converted {layer.FLOAT_KIND}")
            if not layer.matches_float(float_layer):
                raise ValueError(f"load({path}): layer {name}: the model's {float_layer} does not match the file's {layer}")
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
    for name, module in compressed_layers(model):
        module.validate_tensors(tensors, f"{name}.", name)
    model.load_state_dict(tensors, strict=True, assign=rebuilt or mmap)
    # The conversion's edits beyond the layers, as convert applied them (a rebuilt architecture holds the
    # Identity of every fused activation already).
    fused = [] if rebuilt else manifest.get("fused", [])
    if not isinstance(fused, list):
        raise ValueError(f"load({path}): manifest field 'fused' is malformed")
    record = _record_from(manifest, path)
    try:
        switched = apply_plan(model, fused, record.shared_input if record is not None else [],
                              bool(record is not None and record.attention))
    except ValueError as exc:
        raise ValueError(f"load({path}): {exc}") from None
    if record is not None:
        model._pycompress_conversion = record
        if record.attention:
            if sorted(switched) != sorted(record.attention):
                record.notes.append(f"load: the file's model ran fused attention in {len(record.attention)} "
                                    f"modules; this one in {len(switched)}")
    return model

