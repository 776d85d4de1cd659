"""Fuzzed loader: ``pc.load`` over thousands of mutated and truncated artifacts of every format.

The corpus is the golden artifacts (tests/data/golden/v1, v2 and v3, read only): every registered layer
class and format, the entropy-coded file and a shared-input group, in every format version. Each case
takes one artifact and applies one seeded mutation:

- raw bytes, checksums untouched: a flipped bit or a set byte anywhere (the 8-byte header length, the
  safetensors JSON header, the manifest text in it, the tensor payloads), a truncation at any offset,
  garbage appended, bytes inserted or deleted, the header length set to interesting values (0, 2**63,
  one off, past the end);
- safetensors header edits, checksums untouched: a tensor's dtype (same or other item size), shape,
  data offsets (huge declared sizes), a metadata entry dropped or made non-text;
- re-stamped (fresh sha256 of every tensor and of the manifest, as ``tests/test_io.py``'s ``_rewrite``
  does with ``pycompress.io.file_metadata``), so the mutation reaches the validators behind the
  checksums: a manifest key dropped, duplicated in the JSON text (``json`` keeps the last), or its value
  replaced (0, -1, 2**62, 1e308, NaN, strings, lists, dicts, null); a tensor's values set to interesting
  numbers (index arrays to K, -1, 2**31-1; scales to NaN, 0, -x; ...), its dtype viewed as another,
  its shape changed, a tensor dropped, renamed or added.

What each outcome must be:

- refused: a ``ValueError`` (the type itself: ``json.JSONDecodeError`` and ``UnicodeDecodeError`` are
  subclasses and count as leaks) whose message names the file, a layer or a tensor of the artifact;
- loaded: for a version-2 file mutated without re-stamping, the outputs equal the golden outputs bit for
  bit (the checksums must catch every change that matters). Where no checksum can protect the bytes (a
  version-1 file, or a re-stamped mutation: a valid file of another model), the model must run the golden
  inputs on the scalar path and the active ISA path with the same result (int8 formats: the same bits;
  fp32 sparse: the same within float32 reordering) or refuse them with a ``ValueError``: a kernel that reads
  an unchecked index out of bounds shows here or crashes.

Never: a crash (segfault, abort), a hang, an allocation past a few GB, another exception type. The cases
run in child processes (a crash must not kill pytest; one per core, up to 4, case i in child i % n) under
an address-space limit and a per-case watchdog; the parent reports the case that was running when a
child died, and the child writes its input to the test's tmp_path (shard-k/). A failing case reruns
alone with ``python tests/test_fuzz_load.py --case N`` (``PYCOMPRESS_FUZZ_CASES`` / ``PYCOMPRESS_FUZZ_SEED``
widen or move the run).
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import math
import os
import pathlib
import random
import re
import resource
import subprocess
import sys
import tempfile
import time

import pytest

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "golden"
CASES = int(os.environ.get("PYCOMPRESS_FUZZ_CASES", "4000"))
SEED = int(os.environ.get("PYCOMPRESS_FUZZ_SEED", "20261202"))
CASE_TIMEOUT_S = 20  # one load + two forwards of a ~20 KB model take milliseconds
MEMORY_HEADROOM = 3 << 30  # bytes of address space the child may add after its imports


# ---------------------------------------------------------------- the corpus


def artifacts() -> list[pathlib.Path]:
    return sorted(p for p in GOLDEN.glob("v*/*.safetensors") if not p.name.endswith(".io.safetensors"))


def split(data: bytes) -> tuple[dict, bytes]:
    """(safetensors header as a dict, the tensor payload bytes) of a well-formed file."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, payload: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + payload


# ---------------------------------------------------------------- mutations


INTERESTING_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 127, 128, 255, 256, 65535, 65536, 65537, (1 << 24),
                    (1 << 31) - 1, 1 << 31, -(1 << 31), (1 << 32) + 1, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 64]
INTERESTING_JSON = INTERESTING_INTS + [0.0, -0.0, 1.5, -1.0, 1e-45, 1e308, float("inf"), float("nan"), "", "x",
                                       "relu", "gelu", "none", "csr", "nm24", "Int8Linear", "SparseLinear",
                                       "Int8Conv2d", "Im2colConv2d", "SparseInt8Linear", "Int4Linear", "Sequential", "Linear",
                                       "../etc/passwd", "0", None, True, False, [], [0], [1, 1], [-1, 3],
                                       [1 << 40], {}, {"layer": "0"}, {"type": "Linear"}]


def _walk(node, path=()):
    """Every (path, value) inside a JSON document."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


class Mutator:
    """One artifact's bytes and parsed parts, and the mutations of it."""

    def __init__(self, data: bytes) -> None:
        import safetensors.torch

        self.data = data
        self.header, self.payload = split(data)
        self.metadata = self.header.get("__metadata__", {})
        self.manifest = json.loads(self.metadata["pycompress"])
        self.version = self.manifest["version"]
        self.tensors = safetensors.torch.load(data)
        self.header_end = 8 + int.from_bytes(data[:8], "little")

    # ------------------------------------------------ raw bytes (no re-stamping)

    def _offset(self, rng: random.Random) -> int:
        region = rng.choice(("length", "header", "manifest", "payload", "payload"))
        if region == "length":
            return rng.randrange(8)
        if region == "manifest":
            start = self.data.find(b'"pycompress"', 8, self.header_end)
            if start >= 0:
                return rng.randrange(start, self.header_end)
        if region == "payload" and self.header_end < len(self.data):
            return rng.randrange(self.header_end, len(self.data))
        return rng.randrange(8, self.header_end)

    def bitflip(self, rng):
        data = bytearray(self.data)
        at = self._offset(rng)
        data[at] ^= 1 << rng.randrange(8)
        return bytes(data), f"bit flipped at byte {at}"

    def byte_set(self, rng):
        data = bytearray(self.data)
        at = self._offset(rng)
        data[at] = rng.choice(b'\x00\xff\x7f\x80\x01"{}[],:0 9-.eE\\') if rng.random() < 0.7 else rng.randrange(256)
        return bytes(data), f"byte {at} set to {data[at]:#04x}"

    def truncate(self, rng):
        at = rng.choice((rng.randrange(len(self.data)), rng.randrange(self.header_end + 1), self.header_end,
                         len(self.data) - 1, rng.randrange(9)))
        return self.data[:at], f"truncated to {at} bytes"

    def append(self, rng):
        extra = bytes(rng.randrange(256) for _ in range(rng.choice((1, 3, 8, 64))))
        return self.data + extra, f"{len(extra)} garbage bytes appended"

    def splice(self, rng):
        at = self._offset(rng)
        if rng.random() < 0.5:
            n = rng.choice((1, 2, 4, 8))
            return self.data[:at] + bytes(rng.randrange(256) for _ in range(n)) + self.data[at:], f"{n} bytes inserted at {at}"
        n = min(rng.choice((1, 2, 4, 8)), len(self.data) - at)
        return self.data[:at] + self.data[at + n:], f"{n} bytes deleted at {at}"

    def header_length(self, rng):
        n = self.header_end - 8
        value = rng.choice((0, 1, 2, 7, n - 1, n + 1, n - 8, n + 8, len(self.data), len(self.data) - 8,
                            1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 100_000_000))
        return value.to_bytes(8, "little") + self.data[8:], f"header length set to {value}"

    # ------------------------------------------------ safetensors header edits (checksums untouched)

    def header_edit(self, rng):
        header = json.loads(json.dumps(self.header))
        keys = [k for k in header if k != "__metadata__"]
        key = rng.choice(keys)
        entry = header[key]
        what = rng.choice(("dtype", "dtype", "shape", "shape", "offsets", "huge", "metadata", "metadata"))
        if what == "dtype":
            entry["dtype"] = rng.choice(("I8", "U8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64",
                                         "F64", "BOOL", "F8_E4M3", "C64", "XX"))
            desc = f"{key} dtype -> {entry['dtype']}"
        elif what == "shape":
            shape = list(entry["shape"])
            numel = math.prod(shape)
            entry["shape"] = rng.choice(([numel], [1, numel], [numel, 1], shape + [1], [], [0], [numel + 1],
                                         [max(numel - 1, 0)], [numel // 2, 2] if numel % 2 == 0 else [numel, 1, 1],
                                         [-1], [1 << 62, 1 << 2]))
            desc = f"{key} shape -> {entry['shape']}"
        elif what == "offsets":
            a, b = entry["data_offsets"]
            entry["data_offsets"] = rng.choice(([a, b - 1], [a + 1, b], [b, a], [0, b], [a, len(self.payload)],
                                                [a, len(self.payload) + 8], [-1, b]))
            desc = f"{key} data_offsets -> {entry['data_offsets']}"
        elif what == "huge":
            big = rng.choice((1 << 32, 1 << 40, 1 << 62, (1 << 64) - 1))
            entry["shape"] = [big]
            entry["dtype"] = "U8"
            entry["data_offsets"] = [0, big] if rng.random() < 0.5 else entry["data_offsets"]
            desc = f"{key} declared {big} bytes"
        else:
            md = header.setdefault("__metadata__", {})
            mkey = rng.choice(sorted(md) + ["pycompress", "pycompress_sha256"])
            choice = rng.randrange(3)
            if choice == 0:
                md.pop(mkey, None)
                desc = f"metadata {mkey} dropped"
            elif choice == 1:
                md[mkey] = rng.choice((1, None, [], {}, True))
                desc = f"metadata {mkey} -> {md[mkey]!r}"
            else:
                md[mkey] = md.get(mkey, "") + rng.choice((" ", "\x00", "}", "\ud800"))
                desc = f"metadata {mkey} text appended to"
        try:
            return join(header, self.payload), desc
        except UnicodeEncodeError:  # a lone surrogate: write it as JSON escapes
            text = json.dumps(header, ensure_ascii=True).encode()
            return len(text).to_bytes(8, "little") + text + self.payload, desc

    # ------------------------------------------------ re-stamped: the mutation reaches the validators

    def stamp(self, tensors: dict, manifest_text: str | None = None, manifest: dict | None = None) -> bytes:
        """A well-formed file of ``tensors`` and the manifest, with checksums as save writes them (a
        version-1 manifest without checksums stays without)."""
        import safetensors.torch

        from pycompress.io import MANIFEST_DIGEST_KEY, MANIFEST_KEY, tensor_sha256

        if manifest_text is None:
            manifest = dict(self.manifest if manifest is None else manifest)
            if isinstance(manifest.get("checksums"), dict):
                manifest["checksums"] = {k: tensor_sha256(t) for k, t in sorted(tensors.items())}
            manifest_text = json.dumps(manifest)
        metadata = {MANIFEST_KEY: manifest_text}
        if MANIFEST_DIGEST_KEY in self.metadata:
            metadata[MANIFEST_DIGEST_KEY] = hashlib.sha256(manifest_text.encode()).hexdigest()
        return safetensors.torch.save(tensors, metadata=metadata)

    def _restamped_manifest(self) -> dict:
        """The manifest with the checksums a re-stamp would give (so an edit of them is the edit)."""
        return json.loads(json.dumps(self.manifest))

    def manifest_drop(self, rng):
        manifest = self._restamped_manifest()
        paths = [p for p, _ in _walk(manifest) if p and p[0] != "checksums" or len(p) == 1]
        path = rng.choice(paths)
        parent = _get(manifest, path[:-1])
        del parent[path[-1]]
        return self.stamp(self.tensors, manifest=manifest), f"manifest {'/'.join(map(str, path))} dropped"

    def manifest_value(self, rng):
        manifest = self._restamped_manifest()
        paths = [p for p, _ in _walk(manifest) if p and p[0] != "checksums"]
        path = rng.choice(paths)
        parent = _get(manifest, path[:-1])
        value = rng.choice(INTERESTING_JSON)
        parent[path[-1]] = value
        return self.stamp(self.tensors, manifest=manifest), f"manifest {'/'.join(map(str, path))} -> {value!r}"

    def manifest_rename(self, rng):
        manifest = self._restamped_manifest()
        dicts = [p for p, v in _walk(manifest) if isinstance(v, dict) and v and (not p or p[0] != "checksums")]
        path = rng.choice(dicts)
        node = _get(manifest, path)
        old = rng.choice(sorted(node))
        new = rng.choice(("", "x", old + ".", "0", "__proto__", old.upper(), "0.0", "layers"))
        node[new] = node.pop(old)
        return self.stamp(self.tensors, manifest=manifest), f"manifest key {'/'.join(map(str, path + (old,)))} -> {new!r}"

    def manifest_duplicate(self, rng):
        """A JSON object with one key twice (text ``json.dumps`` never writes; ``json.loads`` keeps the last)."""
        manifest = self._restamped_manifest()
        if isinstance(manifest.get("checksums"), dict):
            from pycompress.io import tensor_sha256
            manifest["checksums"] = {k: tensor_sha256(t) for k, t in sorted(self.tensors.items())}
        dicts = [p for p, v in _walk(manifest) if isinstance(v, dict) and v]
        path = rng.choice(dicts)
        node = _get(manifest, path)
        key = rng.choice(sorted(node))
        other = rng.choice(INTERESTING_JSON)
        marker = "\x00DUP\x00"
        first = rng.random() < 0.5  # the duplicate before the real entry (the real one wins) or after (it wins)
        edited = {marker: None, **node} if first else {**node, marker: None}
        if path:
            _get(manifest, path[:-1])[path[-1]] = edited
        else:
            manifest = edited
        text = json.dumps(manifest).replace(f"{json.dumps(marker)}: null", f"{json.dumps(key)}: {json.dumps(other)}", 1)
        return self.stamp(self.tensors, manifest_text=text), \
            f"manifest key {'/'.join(map(str, path + (key,)))} duplicated as {other!r} ({'before' if first else 'after'})"

    def tensor_values(self, rng):
        import torch

        tensors = dict(self.tensors)
        key = rng.choice(sorted(tensors))
        t = tensors[key].clone()
        if t.numel() == 0:
            return self.stamp(tensors), f"{key} (empty) unchanged"
        flat = t.view(-1)
        n = rng.choice((1, 1, 1, 2, 8, flat.numel()))
        picks = [rng.randrange(flat.numel()) for _ in range(n)] if n < flat.numel() else list(range(flat.numel()))
        if t.dtype.is_floating_point:
            value = rng.choice((0.0, -0.0, -1.0, 1.0, 1e-45, 1e38, 3.4e38, float("inf"), float("-inf"),
                                float("nan"), 2.0 ** 24, 0.5))
            sign_flip = rng.random() < 0.2
            for i in picks:
                flat[i] = -flat[i] if sign_flip else value
            desc = f"{key}: {len(picks)} values -> {'-x' if sign_flip else value}"
        else:
            info = torch.iinfo(t.dtype)
            wide = flat.to(torch.int64)  # uint16 / uint32 have few kernels: edit as int64
            k = max(int(wide.max()), 0) + 1
            value = rng.choice([v for v in (0, 1, -1, 2, 3, 4, 7, 8, 16, k - 1, k, k + 1, k + 4, info.max, info.min,
                                            info.max - 1, 127, -127, -128, 255, 1 << 15, 1 << 16) if info.min <= v <= info.max])
            delta = rng.random() < 0.3
            for i in picks:
                wide[i] = max(info.min, min(info.max, int(wide[i]) + rng.choice((-1, 1)))) if delta else value
            t = wide.to(t.dtype).view(t.shape)
            desc = f"{key}: {len(picks)} values {'+-1' if delta else f'-> {value}'}"
        tensors[key] = t
        return self.stamp(tensors), desc

    def tensor_layout(self, rng):
        import torch

        tensors = dict(self.tensors)
        key = rng.choice(sorted(tensors))
        t = tensors[key]
        what = rng.choice(("view", "cast", "reshape", "shorter", "longer", "drop", "rename", "add", "empty"))
        if what == "view":
            others = [d for d in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.uint32, torch.float32,
                                  torch.float16, torch.int64, torch.float64) if d != t.dtype]
            d = rng.choice(others)
            nbytes = t.numel() * t.element_size()
            if nbytes % d.itemsize:
                return self.stamp(tensors), f"{key} not viewable as {d}"
            tensors[key] = t.contiguous().view(-1).view(torch.uint8).view(d).clone()
            desc = f"{key} viewed as {d}"
        elif what == "cast":
            d = rng.choice((torch.int8, torch.int32, torch.int64, torch.float32, torch.float64, torch.uint8, torch.bool))
            tensors[key] = t.to(d)
            desc = f"{key} cast to {d}"
        elif what == "reshape":
            n = t.numel()
            shape = rng.choice(((n,), (1, n), (n, 1), tuple(t.shape) + (1,), (n // 2, 2) if n % 2 == 0 else (n,)))
            tensors[key] = t.reshape(shape).clone()
            desc = f"{key} reshaped to {shape}"
        elif what == "shorter":
            tensors[key] = t.reshape(-1)[:rng.randrange(max(t.numel(), 1))].clone()
            desc = f"{key} cut to {tensors[key].numel()} elements"
        elif what == "longer":
            flat = t.reshape(-1)
            extra = flat[: rng.choice((1, 4, 16))] if flat.numel() else torch.zeros(1, dtype=t.dtype)
            tensors[key] = torch.cat([flat, extra]).clone()
            desc = f"{key} grown to {tensors[key].numel()} elements"
        elif what == "drop":
            del tensors[key]
            desc = f"{key} dropped"
        elif what == "rename":
            new = rng.choice((key + "x", "x." + key, key.replace(".", "_"), "", key.rpartition(".")[0] + ".bias"))
            tensors[new] = tensors.pop(key)
            desc = f"{key} renamed {new!r}"
        elif what == "add":
            new = rng.choice(("extra", key.rpartition(".")[0] + ".extra", key + "/huffman_lengths", "0.bias",
                              "0.weight", "0.gemm.bias"))
            tensors.setdefault(new, torch.zeros(rng.choice((0, 1, 4)), dtype=t.dtype))
            desc = f"tensor {new!r} added"
        else:
            tensors[key] = t.reshape(-1)[:0].clone()
            desc = f"{key} emptied"
        return self.stamp(tensors), desc

    RAW = ("bitflip", "byte_set", "truncate", "append", "splice", "header_length", "header_edit")
    RESTAMPED = ("manifest_drop", "manifest_value", "manifest_rename", "manifest_duplicate", "tensor_values",
                 "tensor_layout")
    KINDS = RAW + RESTAMPED + ("tensor_values", "manifest_value", "bitflip")  # weights: the deeper ones twice


# ---------------------------------------------------------------- the oracle


def _names(m: Mutator) -> set[str]:
    """What a message may name: the artifact's layers and tensors."""
    names = set(m.tensors) | {k for k in m.manifest.get("entropy", {})}
    for layer in m.manifest.get("layers", {}):
        names |= {f"layer {layer}", f"load: {layer}:", f"{layer}."}
    return names


def _message_ok(msg: str, path: str, names: set[str]) -> bool:
    """The message names the file, or a layer or tensor of the artifact, or a layer of the mutated manifest
    (``layer NAME``, as every layer's checks write it)."""
    return path in msg or any(n in msg for n in names) or re.search(r"\blayer \S", msg) is not None


def _same(a, b, exact: bool) -> bool:
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if exact:
        return torch.equal(a, b) or bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
            torch.nan_to_num(a), torch.nan_to_num(b)))
    # fp32 sums in another order: close where both are finite (a huge value may overflow on one path only)
    finite = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[finite], b[finite]
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale))


def _comparable(model) -> bool:
    """Whether two summation orders must agree: fp32 weights of a re-stamped file may be huge enough that
    one order overflows where another does not (and the difference propagates), which is float32, not a bug."""
    import torch

    if not _uses_fp32_kernels(model):
        return True
    return all(bool((t.abs() < 1e12).all()) for t in model.state_dict().values()
               if isinstance(t, torch.Tensor) and t.dtype.is_floating_point)


def _raised_in_pycompress(exc: BaseException) -> bool:
    import traceback

    import pycompress

    package = str(pathlib.Path(pycompress.__file__).resolve().parent)
    return any(str(pathlib.Path(frame.filename).resolve()).startswith(package + os.sep)
               for frame in traceback.extract_tb(exc.__traceback__))


def _uses_fp32_kernels(model) -> bool:
    from pycompress.nn import SparseLinear
    return any(isinstance(m, SparseLinear) for m in model.modules())


def check_case(pc, m: Mutator, data: bytes, kind: str, path: str, golden_io, skeleton_cls) -> tuple[str, str | None]:
    """(outcome, None when the outcome is allowed, else what went wrong)."""
    import torch

    inputs, outputs = golden_io
    with open(path, "wb") as f:
        f.write(data)
    protected = m.version >= 2 and kind in Mutator.RAW  # every change must be refused or change nothing
    try:
        model = pc.load(path, model=None if skeleton_cls is None else skeleton_cls())
    except ValueError as exc:
        if type(exc) is not ValueError:
            return "refused", f"leaked {type(exc).__module__}.{type(exc).__name__}: {exc}"
        if not _message_ok(str(exc), path, _names(m)):
            return "refused", f"message names no file, layer or tensor: {exc}"
        return "refused", None
    except Exception as exc:  # noqa: BLE001 - the leak under test
        return "refused", f"leaked {type(exc).__module__}.{type(exc).__name__}: {exc}"
    model.eval()
    results = {}
    with torch.no_grad():
        for isa in ("scalar", pc.get_isa()):
            previous = pc.get_isa()
            pc.set_isa(isa)
            try:
                results[isa] = [model(x) for x in inputs]
            except Exception as exc:  # noqa: BLE001
                # A pycompress layer refuses what it cannot run with a ValueError; a plain torch module of a
                # re-stamped architecture (Flatten(end_dim=256)) may raise what torch raises.
                if type(exc) is not ValueError and (protected or _raised_in_pycompress(exc)):
                    return "loaded", (f"loaded, then the forward on {isa} raised {type(exc).__module__}."
                                      f"{type(exc).__name__}: {exc}")
                results[isa] = type(exc)
            finally:
                pc.set_isa(previous)
    got, scalar = results[pc.get_isa()], results["scalar"]
    if protected:
        if not isinstance(got, list) or not all(_same(a, b, exact=True) for a, b in zip(got, outputs)):
            return "loaded", "a checksummed file loaded with other outputs"
        return "loaded", None
    state = "loaded" if isinstance(got, list) else "loaded, inputs refused"
    if isinstance(got, list) != isinstance(scalar, list):
        return "loaded", f"the forward failed on one ISA path only: scalar {scalar!r}, {pc.get_isa()} {'ok' if isinstance(got, list) else got!r}"
    if not isinstance(got, list) and got is not scalar:
        return "loaded", f"the forward raised {scalar.__name__} on the scalar path, {got.__name__} on {pc.get_isa()}"
    if isinstance(got, list) and _comparable(model):
        exact = not _uses_fp32_kernels(model)
        if not all(_same(a, b, exact) for a, b in zip(got, scalar)):
            return "loaded", "the loaded model gives other outputs on the scalar path than on the active ISA path"
    return state, None


# ---------------------------------------------------------------- the loop (child process)


def case_plan(seed: int, count: int, corpus: list[pathlib.Path]):
    for i in range(count):
        rng = random.Random(f"{seed}:{i}")
        yield i, rng, corpus[i % len(corpus)], rng.choice(Mutator.KINDS)


def run(seed: int, count: int, out: pathlib.Path, only: int | None = None, shard: tuple[int, int] = (0, 1)) -> dict:
    """Cases [0, count) of ``seed`` (``only``: that case; ``shard`` (k, n): the cases i with i % n == k)."""
    import safetensors.torch
    import torch

    import pycompress as pc

    sys.path.insert(0, str(GOLDEN))
    import make_golden  # noqa: E402  (the skeletons the golden files load with)

    torch.set_num_threads(1)
    corpus = artifacts()
    mutators, ios = {}, {}
    for p in corpus:
        mutators[p] = Mutator(p.read_bytes())
        with safetensors.safe_open(str(p).replace(".safetensors", ".io.safetensors"), framework="pt") as f:
            meta = json.loads(f.metadata()["golden"])
            n = len(list(f.keys())) // 2
            ios[p] = ([f.get_tensor(f"input.{i}") for i in range(n)], [f.get_tensor(f"output.{i}") for i in range(n)],
                      meta["skeleton"] and make_golden.SKELETONS[meta["skeleton"]])
    with open("/proc/self/status") as f:
        vm = int(re.search(r"VmSize:\s+(\d+) kB", f.read()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_HEADROOM, resource.getrlimit(resource.RLIMIT_AS)[1]))
    faulthandler.enable()
    current, pending = out / "current.json", out / "current.json.tmp"
    target = str(out / "case.safetensors")
    stats: dict[str, dict[str, int]] = {}
    failures = []
    start = time.monotonic()
    slowest = (0.0, None)
    for i, rng, artifact, kind in case_plan(seed, count, corpus):
        if (only is not None and i != only) or i % shard[1] != shard[0]:
            continue
        m = mutators[artifact]
        data, desc = getattr(m, kind)(rng)
        label = f"case {i}: {artifact.parent.name}/{artifact.name}: {kind}: {desc}"
        pending.write_text(json.dumps({"case": i, "label": label}))  # check_case writes the input to target
        os.replace(pending, current)  # atomic: a crash never leaves half a label
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        t0 = time.monotonic()
        inputs, outputs, skeleton = ios[artifact]
        try:
            outcome, problem = check_case(pc, m, data, kind, target, (inputs, outputs), skeleton)
        except MemoryError as exc:
            outcome, problem = "MemoryError", f"MemoryError: {exc}"
        faulthandler.cancel_dump_traceback_later()
        elapsed = time.monotonic() - t0
        slowest = max(slowest, (elapsed, label), key=lambda s: s[0])
        outcome = "FAILED" if problem else outcome
        stats.setdefault(kind, {}).setdefault(outcome, 0)
        stats[kind][outcome] += 1
        if problem:
            bad = out / f"failing-case-{i}.safetensors"
            bad.write_bytes(data)
            failures.append(f"{label}\n    {problem}\n    input: {bad}")
    summary = {"cases": len(range(shard[0], count, shard[1])) if only is None else 1, "seconds": round(time.monotonic() - start, 2),
               "slowest": [round(slowest[0], 3), slowest[1]], "stats": stats, "failures": failures}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    current.unlink(missing_ok=True)
    return summary


# ---------------------------------------------------------------- regressions: inputs the fuzzer found


def _edited(tmp_path, artifact: str, edit) -> tuple[str, Mutator]:
    """The golden ``artifact`` with ``edit(manifest)`` applied and re-stamped, as the fuzzer writes it."""
    m = Mutator((GOLDEN / artifact).read_bytes())
    manifest = json.loads(json.dumps(m.manifest))
    edit(manifest)
    path = str(tmp_path / "edited.safetensors")
    pathlib.Path(path).write_bytes(m.stamp(m.tensors, manifest=manifest))
    return path, m


def _set_path(keys, value):
    def edit(manifest):
        _get(manifest, keys[:-1])[keys[-1]] = value
    return edit


def _drop_path(keys):
    def edit(manifest):
        del _get(manifest, keys[:-1])[keys[-1]]
    return edit


def _rename_child(parent_keys, old, new):
    def edit(manifest):
        node = _get(manifest, parent_keys)
        node[new] = node.pop(old)
    return edit


REFUSED = [  # (artifact, edit, the message: each once leaked another exception or named nothing)
    ("v1/int8_static.safetensors", _set_path(("architecture", "type"), [1 << 40]),  # TypeError: unhashable
     r"architecture entry model has type \[1099511627776\]"),
    ("v1/sparse_csr_fp32.safetensors", _set_path(("layers", "2", "config", "activation"), [1, 1]),  # unhashable
     r"load: layer 2: activation \[1, 1\] not in"),
    ("v2/int8_dynamic.safetensors", _set_path(("layers", "2", "config", "activation"), [-1, 3]),
     r"load: layer 2: activation \[-1, 3\] not in"),
    ("v2/entropy_coded.safetensors", _set_path(("entropy", "4.w_packed", "dtype"), ["int8"]),  # unhashable
     r"entropy-coded tensor 4.w_packed: dtype \['int8'\] not in"),
    ("v1/sparse_int8_block.safetensors", _rename_child(("architecture", "children"), "3", "0.0"),  # KeyError
     r"architecture entry model has a child named '0.0'"),
    ("v1/int8_static.safetensors", _rename_child(("architecture", "children"), "0", ""),  # KeyError
     r"architecture entry model has a child named ''"),
    # forward raised TypeError / IndexError from the rebuilt Flatten
    ("v1/sparse_int8_unstructured.safetensors", _set_path(("architecture", "children", "2", "args", "end_dim"), 0.0),
     r"cannot build model.2 as Flatten\(.*end_dim=0.0 is a number, the constructor's default -1 a int"),
    ("v2/sparse_int8_unstructured.safetensors", _set_path(("architecture", "children", "2", "args", "start_dim"), 1.5),
     r"start_dim=1.5 is a number"),
    ("v2/sparse_int8_unstructured.safetensors", _set_path(("architecture", "children", "1", "args", "inplace"), 1),
     r"inplace=1 is a int, the constructor's default False a bool"),
    # named no file
    ("v1/int8_static.safetensors", _drop_path(("layers", "2", "config")), r"manifest entry for layer 2 is malformed"),
    ("v2/int8_dynamic.safetensors", _drop_path(("record", "layers")), r"conversion record is malformed"),
    ("v2/int8_conv.safetensors", _set_path(("architecture", "children", "6", "layer"), "layers"),
     r"architecture entry model.6 refers to unknown layer 'layers'"),
    ("v2/sparse_int8_unstructured.safetensors", _set_path(("architecture", "children", "4", "args"), 1 << 32),
     r"architecture entry model.4 has no constructor arguments"),
]


@pytest.mark.parametrize("artifact,edit,message", REFUSED)
def test_fuzzer_regressions_are_refused_naming_the_file(tmp_path, artifact, edit, message):
    import pycompress as pc

    path, _ = _edited(tmp_path, artifact, edit)
    with pytest.raises(ValueError, match=message) as info:
        pc.load(path)
    assert type(info.value) is ValueError and (path in str(info.value) or "layer 2" in str(info.value))


LOADED = [  # (artifact, edit): a field a file may lack; these raised KeyError
    ("v1/entropy_coded.safetensors", _drop_path(("layers", "0", "config", "name"))),  # SparseLinear
    ("v2/sparse_int8_block.safetensors", _drop_path(("layers", "0", "config", "name"))),  # SparseInt8Linear
    ("v2/sparse_int8_unstructured.safetensors", _drop_path(("layers", "0", "config", "name"))),  # Im2colConv2d
    ("v2/sparse_int8_unstructured.safetensors", _drop_path(("layers", "3", "config", "act_scale"))),
]


@pytest.mark.parametrize("artifact,edit", LOADED)
def test_fuzzer_regressions_load_with_the_golden_outputs(tmp_path, artifact, edit):
    import safetensors.torch
    import torch

    import pycompress as pc

    path, _ = _edited(tmp_path, artifact, edit)
    model = pc.load(path).eval()
    io = safetensors.torch.load_file(str(GOLDEN / artifact).replace(".safetensors", ".io.safetensors"))
    with torch.no_grad():
        for i in range(len(io) // 2):
            assert torch.equal(model(io[f"input.{i}"]), io[f"output.{i}"])


# ---------------------------------------------------------------- the test (parent process)


# Children run the cases in parallel, case i in child i % SHARDS (every case seeded on its own, case_plan).
SHARDS = max(1, min(4, os.cpu_count() or 1))


@pytest.mark.once_per_ci
def test_fuzzed_artifacts_are_refused_with_an_error_or_load_unchanged(tmp_path):
    import pycompress as pc

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(pathlib.Path(pc.__file__).resolve().parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    outs = [tmp_path / f"shard-{k}" for k in range(SHARDS)]
    children = []
    for k, out in enumerate(outs):
        out.mkdir()
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--out", str(out), "--seed", str(SEED),
               "--cases", str(CASES), "--shard", f"{k}/{SHARDS}"]
        children.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + CASE_TIMEOUT_S + CASES * 0.2 / SHARDS
    summaries = []
    for proc, out in zip(children, outs):
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            proc.returncode = None
        current = out / "current.json"
        if proc.returncode != 0:
            for other in children:
                other.kill()
            running = json.loads(current.read_text()) if current.exists() else None
            how = "timed out" if proc.returncode is None else f"exited with status {proc.returncode}"
            where = "before the first case" if running is None else running["label"]
            tail = stdout[-3000:] + stderr[-6000:]
            raise AssertionError(f"the fuzz child {how} during {where} (input: {out / 'case.safetensors'}; rerun "
                                 f"it alone: python {pathlib.Path(__file__).name} --seed {SEED} --cases {CASES} --case "
                                 f"{running and running['case']})\n{tail}")
        summaries.append(json.loads((out / "summary.json").read_text()))
    failures = [f for s in summaries for f in s["failures"]]
    cases = sum(s["cases"] for s in summaries)
    assert not failures, f"{len(failures)} of {cases} cases failed:\n" + "\n".join(failures[:20])
    assert cases == CASES
    covered = {kind for s in summaries for kind in s["stats"]}
    assert covered == set(Mutator.KINDS), sorted(set(Mutator.KINDS) - covered)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--cases", type=int, default=CASES)
    parser.add_argument("--case", type=int, default=None, help="run this case only")
    parser.add_argument("--shard", default="0/1", help="k/n: run the cases i with i %% n == k")
    args = parser.parse_args()
    shard = tuple(int(v) for v in args.shard.split("/"))
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="pycompress-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    summary = run(args.seed, args.cases, out, args.case, shard)
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=1))
    for f in summary["failures"]:
        print(f)
